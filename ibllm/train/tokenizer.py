"""The toy model's own SentencePiece vocabulary, trained on the toy world's text (DESIGN.md, "The toy world").

The corpus is every caption template and Q&A answer of sampled training scenes (questions from the
training part of the question grammar), the "cannot tell" answers plus the Alpaca prompt templates
and the chat transcript markers, so that prompts tokenise into few pieces. LLaMA's conventions are kept: unk 0,
bos 1, eos 2, no pad piece, byte fallback (any UTF-8 input encodes, nothing maps to unk).

    python -m ibllm.train.tokenizer --out assets/toy/tokenizer.model
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm

from ibllm.llm.prompt import PROMPT_NO_INPUT, PROMPT_WITH_INPUT
from ibllm.train import toyworld


def corpus_lines(n_scenes: int = 4000, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lines: list[str] = []
    for _ in range(n_scenes):
        scene = toyworld.sample_scene(rng, "train")
        for modality in toyworld.MODALITIES:
            lines.append(toyworld.caption_for(scene, modality, int(rng.integers(0, 3))))
        for item in toyworld.questions_for("text", scene, rng, per_latent=2):
            lines.append(item["question"])
            lines.append(item["answer"])
    for modality, carried in toyworld.CARRIES.items():  # the honest "I cannot tell ..." answers
        lines.extend(toyworld.cannot_tell(latent, modality) for latent in toyworld.LATENTS if latent not in carried)
    for template in (PROMPT_NO_INPUT, PROMPT_WITH_INPUT):
        lines.extend(template.format(instruction="Describe it.", input="User: Hi\nAssistant: Hello.").splitlines())
    lines.append("Generate caption of this image")
    return [line for line in lines if line.strip()]


def train_tokenizer(out: str | Path, vocab_size: int = 1024, n_scenes: int = 4000, seed: int = 0) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "corpus.txt"
        text.write_text("\n".join(corpus_lines(n_scenes, seed)) + "\n")
        spm.SentencePieceTrainer.train(
            input=str(text), model_prefix=str(Path(tmp) / "sp"), vocab_size=vocab_size, model_type="bpe",
            character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=2, minloglevel=2, hard_vocab_limit=False, split_digits=True,
        )
        out.write_bytes((Path(tmp) / "sp.model").read_bytes())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/toy/tokenizer.model")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--scenes", type=int, default=4000)
    args = parser.parse_args(argv)
    path = train_tokenizer(args.out, args.vocab_size, args.scenes)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
