"""Randomly initialised Stable unCLIP pipelines written as diffusers folders, for the tests and ``bench/picture.py``.

Nothing is downloaded: every component is built from a diffusers / transformers config and saved with
``save_pretrained``, so the folder is read back through the same loader as the real
``stabilityai/stable-diffusion-2-1-unclip`` (``ibllm.imagine.load_pipeline``). The tokenizer is CLIP's own BPE
(``ibllm/data``), cut to its first ``merges`` merges, written as ``vocab.json`` / ``merges.txt``.

- ``"tiny"``: a two-level UNet (32/64 channels), a two-level VAE and a two-layer 32-wide CLIP text encoder;
  32×32 pictures in well under a second on a CPU.
- ``"full"``: the UNet and VAE of the real pipeline at full size (865 M + 84 M parameters, 96×96 latents =
  768×768 pictures, 1024-d text context) with a two-layer text encoder, for timing a denoising step without the
  download. Its UNet alone is 3.5 GB in float32.

Imports of diffusers and transformers sit inside the functions: both are optional (requirements-image.txt).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ibllm.media.bpe import BPETokenizer

# The real pipeline's sizes (the "h" variant's unet/config.json and vae/config.json).
FULL_UNET = {
    "sample_size": 96, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True, "cross_attention_dim": 1024,
}
FULL_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "sample_size": 768}
TINY_UNET = {
    "sample_size": 16, "block_out_channels": (32, 64), "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "attention_head_dim": (2, 4), "use_linear_projection": True, "cross_attention_dim": 32, "norm_num_groups": 8,
}
TINY_VAE = {"block_out_channels": (32, 64), "layers_per_block": 1, "sample_size": 32, "norm_num_groups": 8}
SIZES = {"tiny": (TINY_UNET, TINY_VAE), "full": (FULL_UNET, FULL_VAE)}


def write_clip_tokenizer(out: Path, merges: int = 2000) -> None:
    """CLIP's tokenizer files (vocab.json, merges.txt) from the BPE vocabulary shipped in ``ibllm/data``."""
    bpe = BPETokenizer.from_vocab_file()
    kept = sorted(bpe.ranks, key=bpe.ranks.__getitem__)[:merges]
    small = BPETokenizer(kept)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(small.encoder))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kept))


def write_random_unclip(out: str | Path, *, embed_dim: int, size: str = "tiny", seed: int = 0,
                        normalizer_stats: bool = True) -> Path:
    """A random unCLIP pipeline taking ``embed_dim``-wide image embeddings, saved under ``out``.

    ``normalizer_stats``: give the image normaliser random mean/std (as the real one carries OpenCLIP's statistics)
    instead of 0/1, so the embedding's target length is not simply √embed_dim.
    """
    # Optional packages (requirements-image.txt), slow to import: only when a pipeline is written.
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel  # optional, see above
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (  # optional, see above
        StableUnCLIPImageNormalizer,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # optional, see above

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    unet_cfg, vae_cfg = SIZES[size]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    text_dim = unet_cfg["cross_attention_dim"]

    tokenizer_dir = out / "tokenizer"
    write_clip_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                              model_max_length=77)
    tokenizer.save_pretrained(tokenizer_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=text_dim, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    # The UNet's class embedding reads the image embedding concatenated with its noise-level embedding (2 × E).
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, class_embed_type="projection",
                                projection_class_embeddings_input_dim=2 * embed_dim, **unet_cfg)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * len(vae_cfg["block_out_channels"]),
                        up_block_types=("UpDecoderBlock2D",) * len(vae_cfg["block_out_channels"]), **vae_cfg)
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=embed_dim)
    if normalizer_stats:
        with torch.no_grad():
            normalizer.mean.normal_(0.0, 0.1)
            normalizer.std.uniform_(0.5, 1.5)
    # The real pipeline's schedulers: DDPM (squared cosine) to noise the embedding, DDIM (v-prediction) to denoise.
    noising = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type="v_prediction", set_alpha_to_one=False,
                              steps_offset=1, clip_sample=False)

    for name, part in {"text_encoder": text_encoder, "unet": unet, "vae": vae, "image_normalizer": normalizer,
                       "image_noising_scheduler": noising, "scheduler": scheduler}.items():
        part.save_pretrained(out / name)
    # What DiffusionPipeline.from_pretrained reads to know each folder's class; the image encoder is not written
    # (ibllm feeds embeddings, never pictures, to the pipeline).
    index = {
        "_class_name": "StableUnCLIPImg2ImgPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "image_normalizer": ["stable_diffusion", "StableUnCLIPImageNormalizer"],
        "image_noising_scheduler": ["diffusers", "DDPMScheduler"], "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out
