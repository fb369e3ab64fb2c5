"""Parity of the language side: fuse, visual cache, bind network, prefix query, gated LLaMA, generation.

The encoders are checked by their own group; here the expected normalised embeddings (``emb_normalized.*``) are the
inputs of ``fuse``, and the expected ``mix1.knn.visual_query`` drives the LLaMA checks, so each stage is compared on
its own. Generation (``gen.*``) runs our whole chain: fuse -> (cache) -> bind -> prefix -> injection -> tokens.
Every LLaMA / generation check runs twice: with LoRA as loaded, and merged (``Transformer.merge_lora``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator

import torch

from ibllm.bind import BindNetwork, PrefixQuery, fuse
from ibllm.cache import VisualCache
from ibllm.llm.generate import generate_batch
from ibllm.llm.llama import Transformer
from ibllm.parity.fixture import Comparison, Fixture, build_network

TOL_FEATURE = 1e-5  # fused features, cache similarities, bind-network states (values O(1))
TOL_LOGITS = 1e-4  # logits (values O(1..10))


def _mix_checks(fx: Fixture, bind: BindNetwork, cache: VisualCache) -> Iterator[Comparison]:
    exp, knn = fx.expected, fx.raw_config["knn"]
    for mix, entries in fx.raw_config["mixes"].items():
        fused = fuse([exp[f"emb_normalized.{tensor}"] for _, tensor, _ in entries], [w for _, _, w in entries])
        yield Comparison(f"{mix}.fused", fused, exp[f"{mix}.fused"], TOL_FEATURE)
        stages = bind.stages(fused)
        for i, stage in enumerate(stages[:-1]):
            yield Comparison(f"{mix}.bind_stage{i}", stage, exp[f"{mix}.bind_stage{i}"], TOL_FEATURE)
        yield Comparison(f"{mix}.visual_query_noknn", stages[-1], exp[f"{mix}.visual_query_noknn"], TOL_FEATURE)

        before = exp[f"{mix}.knn.fused_before_knn"]
        after, found = cache.mix_with_neighbours(before, knn["cache_size"], knn["cache_t"], knn["cache_weight"])
        yield Comparison(f"{mix}.knn.idx", torch.from_numpy(found.rows), exp[f"{mix}.knn.idx"], 0.0)
        yield Comparison(f"{mix}.knn.sims", torch.from_numpy(found.sims), exp[f"{mix}.knn.sims"], TOL_FEATURE)
        yield Comparison(f"{mix}.knn.fused_after_knn", after, exp[f"{mix}.knn.fused_after_knn"], TOL_FEATURE)
        stages = bind.stages(after)
        for i, stage in enumerate(stages[:-1]):
            yield Comparison(f"{mix}.knn.bind_stage{i}", stage, exp[f"{mix}.knn.bind_stage{i}"], TOL_FEATURE)
        yield Comparison(f"{mix}.knn.visual_query", stages[-1], exp[f"{mix}.knn.visual_query"], TOL_FEATURE)


def _llama_checks(fx: Fixture, llama: Transformer, prefix: PrefixQuery, tag: str) -> Iterator[Comparison]:
    exp = fx.expected
    tokens = fx.inputs["llama_tokens"]
    n_prefill = fx.raw_config["llama_run"]["prefill_len"]
    injection = llama.visual_injection(prefix(exp["mix1.knn.visual_query"]))
    llama.setup_cache(tokens.shape[0])
    captured: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: captured.append(out)) for layer in llama.layers]
    try:
        logits = llama(tokens[:, :n_prefill], 0, injection, last_only=True)
    finally:
        for h in hooks:
            h.remove()
    for i, out in enumerate(captured):
        yield Comparison(f"llama.prefill_layer_out.{i}{tag}", out, exp[f"llama.prefill_layer_out.{i}"], TOL_LOGITS)
    yield Comparison(f"llama.logits_prefill{tag}", logits, exp["llama.logits_prefill"], TOL_LOGITS)
    steps = [llama(tokens[:, p:p + 1], p, injection, last_only=True) for p in range(n_prefill, tokens.shape[1])]
    yield Comparison(f"llama.logits_steps{tag}", torch.stack(steps), exp["llama.logits_steps"], TOL_LOGITS)


def _generation_checks(fx: Fixture, llama: Transformer, bind: BindNetwork, prefix: PrefixQuery,
                       cache: VisualCache, tag: str) -> Iterator[Comparison]:
    exp, raw = fx.expected, fx.raw_config
    knn, stub = raw["knn"], raw["stub_tokenizer"]
    decoded = json.loads((fx.root / "run_info.json").read_text())["generation_decoded_token_ids"]
    for case, spec in raw["generation"].items():
        rows = spec["samples"]
        mix = spec["mix"]
        if spec["knn"]:
            feature = cache.mix(exp[f"{mix}.knn.fused_before_knn"][rows], knn["cache_size"], knn["cache_t"],
                                knn["cache_weight"])
        else:
            entries = raw["mixes"][mix]
            feature = fuse([exp[f"emb_normalized.{t}"][rows] for _, t, _ in entries], [w for _, _, w in entries])
        visual_query = bind(feature)
        if not tag:  # the visual query does not depend on how LoRA is stored
            yield Comparison(f"gen.{case}.visual_query", visual_query, exp[f"gen.{case}.visual_query"], TOL_FEATURE)
        result = generate_batch(llama, spec["prompts"], llama.visual_injection(prefix(visual_query)),
                                max_gen_len=spec["max_gen_len"], temperature=spec["temperature"],
                                top_p=spec["top_p"], eos_id=stub["eos_id"], pad_id=stub["pad_id"], keep_logits=True)
        yield Comparison(f"gen.{case}.step_logits{tag}", torch.stack(result.step_logits),
                         exp[f"gen.{case}.step_logits"], TOL_LOGITS)
        yield Comparison(f"gen.{case}.token_buffer{tag}", result.tokens, exp[f"gen.{case}.token_buffer"], 0.0)
        yield Comparison(f"gen.{case}.call_start_pos{tag}", torch.tensor(result.call_start_pos),
                         exp[f"gen.{case}.call_start_pos"], 0.0)
        yield Comparison(f"gen.{case}.call_num_tokens{tag}", torch.tensor(result.call_num_tokens),
                         exp[f"gen.{case}.call_num_tokens"], 0.0)
        yield Comparison(f"gen.{case}.greedy_tokens{tag}", torch.tensor(result.generated),
                         torch.tensor(decoded[case]), 0.0, note="run_info.json")


def checks(fx: Fixture) -> Iterator[Comparison]:
    with torch.no_grad():
        net = build_network(fx)  # the real strict loader, as the app loads official weights
        llama, bind, prefix = net.llama, net.bind, net.prefix_query
        cache = VisualCache.build(fx.knn_vectors, kind="flat")
        yield from _mix_checks(fx, bind, cache)
        merged = copy.deepcopy(llama)
        merged.merge_lora()
        for model, tag in ((llama, ""), (merged, " [merged]")):
            yield from _llama_checks(fx, model, prefix, tag)
            yield from _generation_checks(fx, model, bind, prefix, cache, tag)
