"""Pruning statistics of evaluations: hooks count what the language model saw; totals are summed
over data-parallel processes (what `accelerate launch -m lmms_eval --model pruned` runs)."""

import socket

import torch
import torch.multiprocessing as mp

import prune
from prune._tiny import IMAGE_TOKEN, build_prompts, tiny_llava
from prune.evaluation import stats


def _gather_worker(rank, world, port, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    totals = stats.Totals(prefills=1 + rank, prompts=2 + rank, tokens_before=64 * (2 + rank),
                          tokens_after=16 * (2 + rank), prefill_ms=10.0 * (rank + 1))  # fmt: skip
    queue.put((rank, stats.gather_totals(totals)))
    dist.barrier()
    dist.destroy_process_group()


def test_totals_are_summed_over_data_parallel_processes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    expected = stats.Totals(prefills=3, prompts=5, tokens_before=320, tokens_after=80, prefill_ms=30.0)
    assert got[0] == expected == got[1]  # every process gets the sum (lmms-eval calls clean() on all)
    summary = stats.summarize(expected, None)
    assert summary["prune_vision_tokens_before"] == 64 and summary["prune_keep_ratio"] == 0.25
    assert summary["prune_prefill_ms"] == 10.0


def test_hooks_count_prompts_and_kept_tokens_and_remove_cleanly():
    model = tiny_llava()
    ids, mask = build_prompts([[64], [64], []], [6, 9, 5])
    pixels = torch.randn(2, 3, 32, 32)
    counter = stats.PruneStats(model)
    with torch.no_grad():
        model.generate(
            input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3, do_sample=False
        )
    t = counter.totals
    assert (t.prefills, t.prompts, t.tokens_before, t.tokens_after) == (
        1,
        2,
        128,
        128,
    )  # unpruned: placeholders
    assert t.prefill_ms > 0
    prune.wrap(model, "random", keep=0.25)
    counter.reset()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)  # a forward (loglikelihood) counts too
    assert (counter.totals.prompts, counter.totals.tokens_before, counter.totals.tokens_after) == (2, 128, 32)
    prune.unwrap(model)  # removed in the reverse order of installation
    counter.remove()
    assert "generate" not in model.__dict__
    hooks = [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    assert not [
        h for h in hooks if getattr(h, "__module__", "").startswith("prune")
    ]  # transformers' own may stay
    assert IMAGE_TOKEN in stats.PruneStats(model)._placeholder_ids
