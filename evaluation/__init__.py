"""Evaluation: reconstruction FID, text-to-image FID, PSNR/SSIM/LPIPS, codebook figures."""
