"""`kd bench`: speed figures measured side by side in one run, reported as ratios (machines are noisy).

Items (issue 9): 1 decode vs forward tokens/s (the batched-decoding ceiling), 2 the decoder vs HF `generate` at
batch 1 and at a fixed batch (the teacher stage's decoder before kd/generation/decode.py), plus the decoder's token
agreement with batch-1 `generate`, 3 a distill step vs a plain SFT (CE-only) step, 4 offline teacher signal vs
an online teacher forward at every step, 5 `dvc status` / no-op `dvc repro` wall time, 6 growth: the work of the
teacher stage (continuous-batching generation at the teacher's batch), of eval (the student's generation at the
eval batch) and of distill (training steps) at 1x and 4x the question count, as the exponent of t ~ n^k. Item 7
(issue 19): batch invariance, the decoder's tokens at the stage's batch against batch 1 and against fewer prompts
(`eval.limit`), for `compute.decode: invariant` (the default) and `batched` (the decoder before it), and the cost
of the invariant one (its tokens/s over the batched one's, same prompts, alternately). Item 8: bf16 against
float32 matmul speed at the models' shapes (kd/tools/bench/dtypes.py). Each pair runs
alternately, `repeats` times, best time kept. Model loading and process start (a few seconds a stage) are not in
item 6.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from kd.core.paths import SOURCE_ROOT
from kd.generation.decode import greedy_decode

ISA = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "neon", "asimd")
GSM8K = SOURCE_ROOT / "tests" / "data" / "gsm8k" / "test.jsonl"
INSTRUCTION = "Solve the problem step by step. End with the final answer on its own line as '#### <number>'."


def machine() -> dict:
    import transformers

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name":
                cpu = val.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(val.split())
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "isa": [f for f in ISA if f in flags], "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def _best(fns: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Run the callables alternately `repeats` times; the fastest time of each, and each one's last result."""
    times = {k: float("inf") for k in fns}
    results = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            results[k] = fn()
            times[k] = min(times[k], time.perf_counter() - t0)
    return times, results


def prompts_for(tokenizer, n: int) -> list[list[int]]:
    """n chat-templated GSM8K questions (the bundled test rows, cycled)."""
    from kd.data.prompting import chat_ids, render_question

    rows = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [chat_ids(tokenizer, render_question(rows[i % len(rows)]["question"], INSTRUCTION)) for i in range(n)]


def hf_generate(model, prompts, max_new: int, stops: list[int], pad: int, batch_size: int) -> list[list[int]]:
    """Plain HF `generate` over length-sorted fixed batches (left padding), each row cut after its first stop:
    the teacher stage's decoder before kd/generation/decode.py (batch_size 1: the per-prompt reference)."""
    out: list[list[int] | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    for a in range(0, len(order), batch_size):
        idx = order[a:a + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 max_new_tokens=max_new, do_sample=False, num_beams=1, eos_token_id=stops,
                                 pad_token_id=pad)
        for r, i in enumerate(idx):
            row = gen[r, width:].tolist()
            out[i] = row[:next((k + 1 for k, t in enumerate(row) if t in stops), len(row))]
    return out


def _stops(model, tokenizer, prompts, max_new: int) -> list[int]:
    """The model's eos; for a random (tiny) model that never emits it, plus the token whose first occurrence
    gives a mean response length nearest 40 % of max_new (real answers: ~67 of 160 tokens)."""
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [tokenizer.eos_token_id])
    free = greedy_decode(model, prompts, max_new_tokens=max_new, stop_ids=eos, pad_id=tokenizer.pad_token_id,
                         batch_size=len(prompts))
    if sum(map(len, free)) < 0.9 * max_new * len(free):
        return eos  # the model stops by itself

    def mean_len(t):
        return sum(r.index(t) + 1 if t in r else len(r) for r in free) / len(free)

    cands = sorted({t for r in free for t in r} - set(eos))
    return eos + [min(cands, key=lambda t: (abs(mean_len(t) - 0.4 * max_new), t))]


def bench_decoding(model, tokenizer, *, n: int, batch: int, max_new: int, b1_rows: int, repeats: int) -> dict:
    pad = tokenizer.pad_token_id
    prompts = prompts_for(tokenizer, n)
    stops = _stops(model, tokenizer, prompts, max_new)

    # 1. the ceiling: decode steps (no stops: every row makes max_new tokens; the prefill and first token, timed
    # in a 1-token run, subtracted) vs one forward over as many tokens
    dec_rows = prompts[:batch]
    fwd_ids = torch.randint(0, 256, (batch, max_new), generator=torch.Generator().manual_seed(0)).to(model.device)
    def forward():
        with torch.no_grad():
            return model(input_ids=fwd_ids, logits_to_keep=1)

    def decode(k):
        return lambda: greedy_decode(model, dec_rows, max_new_tokens=k, stop_ids=[], pad_id=pad, batch_size=batch)

    times, _ = _best({"decode": decode(max_new), "prefill_and_first": decode(1), "forward": forward}, repeats)
    tokens = len(dec_rows) * max_new
    steps = times["decode"] - times["prefill_and_first"]
    ceiling = {"tokens": tokens, "decode_tokens_per_s": len(dec_rows) * (max_new - 1) / steps,
               "forward_tokens_per_s": tokens / times["forward"]}
    ceiling["decode_over_forward"] = ceiling["decode_tokens_per_s"] / ceiling["forward_tokens_per_s"]

    # 2. the decoder over all prompts vs HF generate at a fixed batch (all prompts) and at batch 1 (its tokens/s
    # measured on the first b1_rows prompts: at batch 1 every row runs alone, so a sample gives the rate)
    sub = prompts[:b1_rows]
    times, res = _best({
        "ours": lambda: greedy_decode(model, prompts, max_new_tokens=max_new, stop_ids=stops, pad_id=pad,
                                      batch_size=batch),
        "hf_fixed_batch": lambda: hf_generate(model, prompts, max_new, stops, pad, batch),
        "hf_batch1": lambda: hf_generate(model, sub, max_new, stops, pad, 1),
    }, repeats)
    ours, ref1, fixed = res["ours"], res["hf_batch1"], res["hf_fixed_batch"]
    tps = {k: sum(map(len, res[k])) / times[k] for k in times}
    same = [a == b for a, b in zip(ours[:b1_rows], ref1)]
    first_diff = [next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                  for a, b in zip(ours[:b1_rows], ref1) if a != b]
    return {
        "prompts": n, "batch": batch, "max_new_tokens": max_new, "batch1_rows": b1_rows,
        "mean_response_tokens": sum(map(len, ours)) / n, "stop_ids": stops,
        "1_ceiling": ceiling,
        "2_decoder": {"tokens_per_s": tps, "vs_hf_batch1": tps["ours"] / tps["hf_batch1"],
                      "vs_hf_fixed_batch": tps["ours"] / tps["hf_fixed_batch"],
                      "rows_equal_to_hf_batch1": sum(same), "rows_compared": len(same),
                      "first_difference_at_token": first_diff,
                      "rows_equal_fixed_batch_vs_hf_batch1": sum(a == b for a, b in zip(fixed[:b1_rows], ref1))},
    }


def bench_growth_decoding(model, tokenizer, *, n: int, batch: int, max_new: int) -> dict:
    """6: generation wall time for n and 4n questions at a fixed batch (rows leave and join as they finish)."""
    pad = tokenizer.pad_token_id
    prompts = prompts_for(tokenizer, 4 * n)
    stops = _stops(model, tokenizer, prompts[:n], max_new)
    times, res = _best({
        "1x": lambda: greedy_decode(model, prompts[:n], max_new_tokens=max_new, stop_ids=stops, pad_id=pad,
                                    batch_size=batch),
        "4x": lambda: greedy_decode(model, prompts, max_new_tokens=max_new, stop_ids=stops, pad_id=pad,
                                    batch_size=batch),
    }, 1)
    return {"questions": [n, 4 * n], "batch": batch, "max_new_tokens": max_new, "seconds": [times["1x"], times["4x"]],
            "tokens": [sum(map(len, res["1x"])), sum(map(len, res["4x"]))],
            "exponent": _exponent([times["1x"], times["4x"]])}


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> int:
    """Reset this process's peak RSS to its current RSS (Linux: `5` to /proc/self/clear_refs); the RSS in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def _train_step_child(conn, student_dir, teacher_dir, dtype, variant, seq, resp, steps, threads):
    """One kind of training step, `steps` times, in a fresh process (for its own peak memory)."""
    torch.set_num_threads(threads)
    from peft import LoraConfig, get_peft_model

    from kd.models.loading import load_model
    from kd.train.distill import example_loss
    from kd.train.examples import Example

    torch.manual_seed(0)
    student = get_peft_model(load_model(student_dir, dtype), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
    student.train()
    teacher = load_model(teacher_dir, dtype) if variant == "distill_online" else None
    vocab = student.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, 256, (seq,), generator=torch.Generator().manual_seed(1)).tolist()
    ex = Example(0, ids, seq - resp, resp)
    offline = torch.randn(resp, vocab, generator=torch.Generator().manual_seed(2)).to(torch.float16)
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1e-4)

    def step():
        if variant == "sft":
            labels = torch.tensor([[-100] * (seq - resp) + ids[seq - resp:]])
            loss = student(input_ids=torch.tensor([ids]), labels=labels).loss
        else:
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(input_ids=torch.tensor([ids])).logits[0, seq - resp - 1:seq - 1].float()
            else:
                t_logits = offline.float()
            loss = example_loss(student, ex, lambda a, b: t_logits[a:b], 0.5, 2.0, "reverse_kl", "teacher",
                                128, vocab)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    # the peak from here on: ru_maxrss would be the spawning parent's (Linux keeps it across exec) or the model
    # load's, so reset the kernel's high-water mark (VmHWM) to the current RSS and read it after the steps
    base = _reset_peak_rss()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = time.perf_counter() - t0
    conn.send({"seconds": dt, "peak_rss_kib": _status_kib("VmHWM"), "rss_at_start_kib": base})


def _train_steps(student_dir, teacher_dir, dtype: str, variant: str, seq: int, resp: int, steps: int) -> dict:
    """`steps` training steps of one kind in a fresh process (its own peak memory): seconds, peak RSS."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_train_step_child, args=(b, str(student_dir), str(teacher_dir), dtype, variant, seq, resp,
                                                    steps, torch.get_num_threads()))
    p.start()
    out = a.recv()
    p.join()
    return out


def _exponent(seconds: list[float]) -> float:
    """k in t ~ n^k from the times at n and 4n."""
    import math

    return math.log(seconds[1] / seconds[0]) / math.log(4)


def _added_kib(run: dict) -> int:
    """KiB the steps added above the RSS they started at (weights, optimizer state already loaded)."""
    return max(run["peak_rss_kib"] - run["rss_at_start_kib"], 1)


def bench_training(student_dir, teacher_dir, dtype: str, *, seq: int, resp: int, steps: int) -> dict:
    """3 and 4: tokens/s and peak RSS of a distill step (offline signal / online teacher) vs a plain SFT step."""
    out = {}
    for variant in ("sft", "distill_offline", "distill_online"):
        out[variant] = _train_steps(student_dir, teacher_dir, dtype, variant, seq, resp, steps)
        out[variant]["tokens_per_s"] = steps * seq / out[variant]["seconds"]
    return {"sequence_tokens": seq, "response_tokens": resp, "steps": steps, "runs": out,
            "3_distill_vs_sft_speed": out["distill_offline"]["tokens_per_s"] / out["sft"]["tokens_per_s"],
            "3_distill_vs_sft_peak_rss": out["distill_offline"]["peak_rss_kib"] / out["sft"]["peak_rss_kib"],
            "3_distill_vs_sft_step_memory": _added_kib(out["distill_offline"]) / _added_kib(out["sft"]),
            "4_offline_vs_online_speedup": out["distill_offline"]["tokens_per_s"]
            / out["distill_online"]["tokens_per_s"]}


def bench_growth_training(student_dir, teacher_dir, dtype: str, *, seq: int, resp: int, steps: int) -> dict:
    """6: distill (offline signal) wall time for `steps` and 4x `steps` examples (one example a step)."""
    secs = [_train_steps(student_dir, teacher_dir, dtype, "distill_offline", seq, resp, k)["seconds"]
            for k in (steps, 4 * steps)]
    return {"questions": [steps, 4 * steps], "seconds": secs, "exponent": _exponent(secs)}


def bench_dvc(root: Path) -> dict:
    """5: wall time of `dvc status` and, when that finds nothing to do, of a no-op `dvc repro`."""
    def run(*args):
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
        return time.perf_counter() - t0, res

    dt, res = run("status")
    out = {"status_seconds": dt, "status_up_to_date": res.returncode == 0 and "up to date" in res.stdout}
    if out["status_up_to_date"]:
        out["noop_repro_seconds"] = run("repro")[0]
    return out


SIZES = {  # prompts, batch (today's teacher batch for the real pair), max_new_tokens, batch-1 rows, repeats;
    # growth: base question count (and 4x), the teacher's and eval's batch sizes (the cpu profile's)
    "tiny": dict(n=16, batch=8, max_new=48, b1_rows=6, repeats=2, seq=256, resp=128, steps=3,
                 growth_n=4, teacher_batch=8, eval_batch=4),
    "real": dict(n=48, batch=24, max_new=160, b1_rows=3, repeats=1, seq=384, resp=160, steps=2,
                 growth_n=6, teacher_batch=24, eval_batch=16),
}


def run_bench(models_dir: Path, size: str, dtype: str, root: Path, out: Path, train: bool = True,
              growth: bool = True, log: Callable[[str], None] = print) -> dict:
    from kd.core.io import write_json
    from kd.core.seeding import seed_everything
    from kd.models.loading import load_model, load_tokenizer

    cfg = SIZES[size]
    result = {"machine": machine(), "size": size, "dtype": dtype, "models": {}}
    for role in ("teacher", "student"):
        seed_everything(0)
        tok = load_tokenizer(models_dir / role)
        model = load_model(models_dir / role, dtype, device="cpu")
        log(f"bench: decoding, {role}")
        result["models"][role] = bench_decoding(model, tok, n=cfg["n"], batch=cfg["batch"], max_new=cfg["max_new"],
                                                b1_rows=cfg["b1_rows"], repeats=cfg["repeats"])
        if growth:  # the teacher stage's generation (teacher) and eval's (student) at 1x and 4x the questions
            log(f"bench: growth, {role}")
            result["models"][role]["6_growth"] = bench_growth_decoding(
                model, tok, n=cfg["growth_n"], max_new=cfg["max_new"],
                batch=cfg["teacher_batch"] if role == "teacher" else cfg["eval_batch"])
        log(f"bench: batch invariance, {role}")
        from kd.tools.bench.invariance import bench_invariance

        result["models"][role]["7_invariance"] = bench_invariance(
            model, tok, n=cfg["n"], batch=cfg["batch"], max_new=cfg["max_new"], b1_rows=cfg["b1_rows"],
            repeats=cfg["repeats"])
        del model
    if train:
        log("bench: training steps (sft, distill offline, distill online)")
        result["training"] = bench_training(models_dir / "student", models_dir / "teacher", dtype,
                                            seq=cfg["seq"], resp=cfg["resp"], steps=cfg["steps"])
        if growth:
            log("bench: growth, distill steps")
            result["training"]["6_growth"] = bench_growth_training(
                models_dir / "student", models_dir / "teacher", dtype, seq=cfg["seq"], resp=cfg["resp"],
                steps=cfg["steps"])
    log("bench: bf16 vs float32 matmuls")
    from kd.tools.bench.dtypes import bench_dtypes

    result["8_dtypes"] = bench_dtypes(models_dir)["8_dtypes"]
    log("bench: dvc")
    result["dvc"] = bench_dvc(root)
    write_json(out, result)
    return result
