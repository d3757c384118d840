"""Caption tokenizer: round trip, normalisation, special ids, truncation/padding, JSON, training CLI."""

import pytest
import torch

from data_pipeline.train_tokenizer import main as train_tokenizer_main
from divae.prior import PriorConfig, PriorModel
from divae.text_tokenizer import TextTokenizer

CAPTIONS = [
    "A cat sitting on a table.",
    "Two  dogs\tplaying in the SNOW",
    "a young girl eating a very large sandwich, with a smile",
    "Café au lait on a wooden counter -- 東京 at night!",
    "a red bus driving down a city street",
] * 4


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.train(CAPTIONS, vocab_size=320, max_length=48)


def test_round_trip_and_normalisation(tok):
    ids, mask = tok.encode(CAPTIONS[:5] + ["an unseen caption: Zebra 42 ☃"])
    decoded = tok.decode(ids)
    for src, out in zip(CAPTIONS[:5] + ["an unseen caption: Zebra 42 ☃"], decoded):
        assert out == tok.normalize(src)
    assert decoded[1] == "two dogs playing in the snow"  # lower-cased, whitespace collapsed
    assert ids.shape == mask.shape == (6, 48) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert 280 <= tok.vocab_size <= 320


def test_special_tokens_padding_truncation(tok):
    ids, mask = tok.encode(["", "a cat"])
    assert ids[0, :2].tolist() == [1, 2] and mask[0].sum() == 2 and (ids[0, 2:] == 0).all()
    n = int(mask[1].sum())
    assert ids[1, 0] == 1 and ids[1, n - 1] == 2 and not mask[1, n:].any() and (ids[1, n:] == 0).all()
    # the empty caption is exactly the prior's null caption
    null_ids, null_mask = PriorModel(PriorConfig(text_vocab_size=320, text_len=48, image_vocab_size=8,
                                                 image_h=2, image_w=2, dim=16, n_heads=2, enc_layers=1,
                                                 dec_layers=1)).null_text(1)
    assert torch.equal(ids[:1], null_ids) and torch.equal(mask[:1], null_mask)
    long = " ".join(["sandwich"] * 50)
    ids, mask = tok.encode([long])
    assert mask.all() and ids[0, 0] == 1 and ids[0, -1] == 2  # truncated, [EOS] kept
    assert tok.decode(ids)[0].startswith("sandwich sandwich")


def test_json_round_trip(tok, tmp_path):
    tok2 = TextTokenizer.from_json(tok.to_json())
    assert tok2.max_length == 48
    assert torch.equal(tok2.encode(CAPTIONS)[0], tok.encode(CAPTIONS)[0])
    tok.save(tmp_path / "t.json")
    assert TextTokenizer.load(tmp_path / "t.json").to_json() == tok.to_json()
    with pytest.raises(FileNotFoundError, match="train_tokenizer"):
        TextTokenizer.load(tmp_path / "missing.json")


def test_bad_input(tok):
    with pytest.raises(TypeError, match="list"):
        tok.encode("a cat")
    with pytest.raises(TypeError, match="must be str"):
        tok.encode(["a cat", None])
    with pytest.raises(ValueError, match="too small"):
        TextTokenizer.train(CAPTIONS, vocab_size=100)


def test_train_cli_from_mds_shards(tmp_path, capsys):
    from streaming import MDSWriter

    shards = tmp_path / "shards"
    columns = {"jpg": "bytes", "label": "int", "caption": "str", "key": "str", "orig_size": "str"}
    with MDSWriter(out=str(shards), columns=columns, size_limit=2048) as w:
        for i, c in enumerate(CAPTIONS * 3 + [""]):
            w.write({"jpg": b"\xff\xd8" + bytes(100), "label": -1, "caption": c, "key": f"{i:06d}",
                     "orig_size": "256x256"})
    assert len(list(shards.glob("*.mds"))) > 1
    out = train_tokenizer_main(["--shards", str(shards), "--vocab-size", "300", "--max-length", "40"])
    assert out == shards / "tokenizer.json"
    tok = TextTokenizer.load(out)
    assert tok.max_length == 40 and tok.vocab_size <= 300
    assert tok.decode(tok.encode([CAPTIONS[2]])[0]) == [tok.normalize(CAPTIONS[2])]
    assert "trained on 60 captions" in capsys.readouterr().out  # the empty caption is skipped


def test_train_cli_from_text_file(tmp_path):
    f = tmp_path / "captions.txt"
    f.write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    out = train_tokenizer_main(["--captions", str(f), "--vocab-size", "290", "--out", str(tmp_path / "tk.json")])
    tok = TextTokenizer.load(out)
    assert tok.max_length == 64
    assert tok.decode(tok.encode(CAPTIONS[:2])[0]) == [tok.normalize(c) for c in CAPTIONS[:2]]
    with pytest.raises(SystemExit):
        train_tokenizer_main(["--captions", str(f)])  # --out is required without --shards


def test_train_cli_from_webdataset_tars(tmp_path):
    import io
    import tarfile

    shards = tmp_path / "wds"
    shards.mkdir()
    for s in range(2):
        with tarfile.open(shards / f"shard-{s:05d}.tar", "w") as tf:
            for i, c in enumerate(CAPTIONS):
                for ext, data in (("caption", c.encode()), ("jpg", bytes(10))):
                    info = tarfile.TarInfo(f"{s}{i:05d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    out = train_tokenizer_main(["--shards", str(shards), "--vocab-size", "300"])
    tok = TextTokenizer.load(out)
    assert out == shards / "tokenizer.json"
    assert tok.decode(tok.encode([CAPTIONS[3]])[0]) == [tok.normalize(CAPTIONS[3])]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no MDS index.json"):
        train_tokenizer_main(["--shards", str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="not a folder"):
        train_tokenizer_main(["--shards", str(tmp_path / "missing")])


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_train_cli_from_prepared_shards(tmp_path, fmt):
    from data_pipeline.shards import STANDARD_COLUMNS, ShardWriter

    shards = tmp_path / fmt
    with ShardWriter(str(shards), columns=STANDARD_COLUMNS, fmt=fmt, shard_size=7) as w:
        for i, c in enumerate(CAPTIONS * 2):
            w.write({"jpg": bytes(10), "label": -1, "caption": c, "key": f"{i:06d}", "orig_size": "256x256"})
    out = train_tokenizer_main(["--shards", str(shards), "--vocab-size", "300"])
    assert out == shards / "tokenizer.json"
    tok = TextTokenizer.load(out)
    assert tok.decode(tok.encode([CAPTIONS[4]])[0]) == [tok.normalize(CAPTIONS[4])]
