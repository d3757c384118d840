"""Caption tokenizer for the prior: a thin wrapper over a byte-level BPE from the `tokenizers` library.

Normalisation (applied before BPE, so also what `decode` gives back): Unicode NFKC, lower-casing, every
run of whitespace collapsed to one space, leading/trailing whitespace stripped. Byte-level BPE has no
unknown token: any text encodes. Each caption becomes `[BOS] tokens [EOS]`, truncated to `max_length`
(the [EOS] is kept) and right-padded with [PAD]. The special tokens have fixed ids [PAD]=0, [BOS]=1, [EOS]=2,
which `divae.prior.PriorConfig` assumes; the empty caption "" is `[BOS][EOS]`, the prior's null caption.

    tok = TextTokenizer.train(captions, vocab_size=16384)
    ids, mask = tok.encode(["a cat on a mat"])       # (1, 64) long, (1, 64) bool
    tok.decode(ids)                                  # ["a cat on a mat"]
    TextTokenizer.from_json(tok.to_json())           # the same tokenizer (travels inside checkpoints)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

PAD, BOS, EOS = "[PAD]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2
DEFAULT_MAX_LENGTH = 64


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(),
                                 normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])


def _with_pipeline(tok: Tokenizer) -> Tokenizer:
    """`tok` with the one text pipeline of every caption tokenizer: normalizer, byte-level pre-tokenizer and
    decoder, [BOS] ... [EOS] template."""
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}", special_tokens=[(BOS, 1), (EOS, 2)])
    return tok


PIPELINE_KEYS = ("normalizer", "pre_tokenizer", "decoder", "post_processor")


def check_pipeline(obj: object) -> None:
    """Refuse a tokenizer JSON (parsed, untrusted: it travels inside prior checkpoints) whose pipeline is not the
    one `TextTokenizer.train` builds, or whose model is not a BPE, before the `tokenizers` library compiles any
    of it (a crafted normalizer regex can panic in Rust, which no `except Exception` catches)."""
    want = json.loads(_with_pipeline(Tokenizer(models.BPE())).to_str())
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict) or obj["model"].get("type") != "BPE":
        raise ValueError("not a byte-level BPE tokenizer JSON (no BPE model); train one with TextTokenizer.train "
                         "/ python -m data_pipeline.train_tokenizer")
    diff = [k for k in PIPELINE_KEYS if obj.get(k) != want[k]]
    if diff:
        raise ValueError(f"tokenizer JSON has another {diff[0]} than the one TextTokenizer.train builds "
                         f"({str(obj.get(diff[0]))[:120]}); refusing it: retrain it with "
                         "python -m data_pipeline.train_tokenizer")


class TextTokenizer:
    """Encode/decode batches of captions to fixed-length id tensors."""

    def __init__(self, tokenizer: Tokenizer, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        for i, tok in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(tok) != i:
                raise ValueError(f"tokenizer must have {tok} at id {i} (got {tokenizer.token_to_id(tok)}); "
                                 "train it with TextTokenizer.train / python -m data_pipeline.train_tokenizer")
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be >= 2 (room for [BOS] and [EOS])")
        self.max_length = int(max_length)
        tokenizer.enable_truncation(self.max_length)
        tokenizer.enable_padding(pad_id=0, pad_token=PAD, length=self.max_length)
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int = 16384, *, max_length: int = DEFAULT_MAX_LENGTH,
              min_frequency: int = 2, show_progress: bool = False) -> TextTokenizer:
        """Train a byte-level BPE with `vocab_size` tokens (special and the 256 byte tokens included)."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
                             f"{256 + len(SPECIAL_TOKENS)} (256 bytes + 3 special tokens)")
        tok = _with_pipeline(Tokenizer(models.BPE()))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS), show_progress=show_progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator((c for c in captions if isinstance(c, str) and c.strip()), trainer=trainer)
        return cls(tok, max_length)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def normalize(self, text: str) -> str:
        """The normalised text that `decode(encode(text))` returns when nothing was truncated."""
        return self.tokenizer.normalizer.normalize_str(text)

    def encode(self, captions: Sequence[str], device: torch.device | str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> ids (B, max_length) long and mask (B, max_length) bool (True = real token)."""
        if isinstance(captions, str):
            raise TypeError("encode takes a list of captions; wrap a single caption in a list")
        captions = list(captions)
        bad = [i for i, c in enumerate(captions) if not isinstance(c, str)]
        if bad:
            raise TypeError(f"captions must be str; item {bad[0]} is {type(captions[bad[0]]).__name__} "
                            "(use '' for an image without a caption)")
        encs = self.tokenizer.encode_batch(captions)
        ids = torch.tensor([e.ids for e in encs], dtype=torch.long, device=device)
        mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.bool, device=device)
        return ids.view(len(captions), self.max_length), mask.view(len(captions), self.max_length)

    def decode(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """(B, L) ids -> captions, special tokens dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode_batch([list(map(int, row)) for row in ids], skip_special_tokens=True)

    def to_json(self) -> str:
        """The whole tokenizer (vocabulary, merges, normaliser, max length) as one JSON string."""
        return self.tokenizer.to_str()

    @classmethod
    def from_json(cls, text: str) -> TextTokenizer:
        """The tokenizer of `to_json`'s text; a ValueError for a JSON whose pipeline is not `train`'s."""
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise ValueError(f"tokenizer JSON is not JSON ({e})") from None
        check_pipeline(obj)
        tok = Tokenizer.from_str(text)
        trunc = tok.truncation
        return cls(tok, trunc["max_length"] if trunc else DEFAULT_MAX_LENGTH)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found: train one with `python -m "
                                    "data_pipeline.train_tokenizer --shards DIR` (writes DIR/tokenizer.json)")
        return cls.from_json(path.read_text(encoding="utf-8"))
