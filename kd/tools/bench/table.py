"""`kd bench`'s markdown table (the README's and docs/speed.md's), from a bench.json result."""

from __future__ import annotations

HEADER = ["| item | figure | teacher | student | target |", "|---|---|---|---|---|"]


def table(r: dict) -> str:
    """The README's markdown table for one bench.json."""
    m = r["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), ISA "
             f"{' '.join(m['isa']) or '-'}; torch {m['torch']}, transformers {m['transformers']}; "
             f"{r['size']} models, {r['dtype']}.", "",
             *HEADER]
    t, s = r["models"]["teacher"], r["models"]["student"]
    lines.append(f"| 1 | decode / forward tokens/s | {t['1_ceiling']['decode_over_forward']:.2f}x | "
                 f"{s['1_ceiling']['decode_over_forward']:.2f}x | >= 0.5x |")
    lines.append(f"| 2 | decoder / HF generate, batch 1 | {t['2_decoder']['vs_hf_batch1']:.2f}x | "
                 f"{s['2_decoder']['vs_hf_batch1']:.2f}x | >= 5x |")
    lines.append(f"| 2 | decoder / HF generate, batch {t['batch']} | {t['2_decoder']['vs_hf_fixed_batch']:.2f}x | "
                 f"{s['2_decoder']['vs_hf_fixed_batch']:.2f}x | >= 2x |")
    lines.append(f"| 2 | rows equal to HF batch 1 | {t['2_decoder']['rows_equal_to_hf_batch1']}/"
                 f"{t['2_decoder']['rows_compared']} | {s['2_decoder']['rows_equal_to_hf_batch1']}/"
                 f"{s['2_decoder']['rows_compared']} | all (float32) |")
    if "training" in r:
        tr = r["training"]
        lines.append(f"| 3 | distill / SFT step tokens/s | | {tr['3_distill_vs_sft_speed']:.2f}x | >= 0.8x |")
        lines.append(f"| 3 | distill / SFT step peak RSS | | {tr['3_distill_vs_sft_peak_rss']:.2f}x | <= 1.2x |")
        if "3_distill_vs_sft_step_memory" in tr:
            lines.append(f"| 3 | distill / SFT memory the steps add over the loaded model | | "
                         f"{tr['3_distill_vs_sft_step_memory']:.2f}x | |")
        lines.append(f"| 4 | offline / online teacher signal, step speed | | "
                     f"{tr['4_offline_vs_online_speedup']:.2f}x | |")
    iv = [r["models"][k].get("7_invariance") for k in ("teacher", "student")]
    if all(iv):
        cells = lambda f: " | ".join(f(v) for v in iv)  # noqa: E731
        lines.append("| 7 | invariant / batched decoder tokens/s | "
                     f"{cells(lambda v: format(v['invariant_over_batched_speed'], '.2f') + 'x')} | |")
        for mode in ("invariant", "batched"):
            lines.append(f"| 7 | {mode}: rows equal at batch {iv[0]['batch']} and batch 1; with half the prompts | "
                         + cells(lambda v: f"{v[mode]['rows_equal_to_batch1']}/{v['batch1_rows']}; "
                                           f"{v[mode]['rows_equal_with_fewer_prompts']}/{v['limit_rows']}")
                         + (" | all |" if mode == "invariant" else " | |"))
    if "8_dtypes" in r:
        lines.extend(dtype_rows(r))
    d = r["dvc"]
    for name, g in (("teacher generation", t.get("6_growth")), ("eval generation (student)", s.get("6_growth")),
                    ("distill steps", r.get("training", {}).get("6_growth"))):
        if g:
            col = "| {} | |".format(f"{g['exponent']:.2f}") if name.startswith("teacher") else \
                "| | {} |".format(f"{g['exponent']:.2f}")
            lines.append(f"| 6 | {name}: {g['questions'][0]} -> {g['questions'][1]} questions, "
                         f"{g['seconds'][0]:.1f} -> {g['seconds'][1]:.1f} s, exponent k (t ~ n^k) {col} 1 = linear |")
    lines.append(f"| 5 | `dvc status` seconds | {d['status_seconds']:.2f} s | | <= 2 s |")
    if "noop_repro_seconds" in d:
        lines.append(f"| 5 | no-op `dvc repro` seconds | {d['noop_repro_seconds']:.2f} s | | <= 2 s |")
    return "\n".join(lines)


def dtype_rows(result: dict) -> list[str]:
    """Markdown rows for the bench table: one per op and row count, teacher and student columns."""
    by = {}
    for it in result["8_dtypes"]:
        by.setdefault((it["op"], it["rows"]), {})[it["role"]] = it
    lines = []
    for (op, rows), cells in by.items():
        fmt = lambda r: f"{cells[r]['bf16_over_float32']:.2f}x" if r in cells else ""  # noqa: E731
        lines.append(f"| 8 | bf16 / float32 speed, {op.replace('_', '-')} matmul, {rows} rows | {fmt('teacher')} | "
                     f"{fmt('student')} | > 1x: bf16 pays here |")
    return lines


def dtypes_table(result: dict) -> str:
    """`kd bench --only-dtypes`'s table: item 8 alone."""
    return "\n".join([*HEADER, *dtype_rows(result)])
