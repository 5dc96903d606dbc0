"""Stages `eval_*`: zero-shot GSM8K accuracy of one arm (kd/config/arms.py) via lm-eval."""

import kd.core.portable; kd.core.portable.apply()  # noqa: E702 - compute.portable: ISA caps, before torch loads

import click

from kd.core.entry import run_stage


@click.command()
@click.argument("model")
def main(model):
    from kd.config.arms import arm_names
    from kd.data.prompting import check_context
    from kd.eval.evaluate import resolve_model
    from kd.harness.stage import Stage

    st = Stage("eval", model, kind="model", allowed=lambda c: arm_names(c.prompting.strategies), key="arm")
    resolve_model(model, st.c)  # a bad name fails here, before torch / lm-eval are imported
    check_context(st.c, ".", uses=("eval",), eval_models=[model])  # before the weights load

    from kd.eval.evaluate import evaluate_model

    s = evaluate_model(model, st.c)
    st.finish(f"{s['items']} items, {s['tokens']} tokens; accuracy strict {s['accuracy_strict']:.3f} "
              f"[{s['ci95_strict_low']:.3f}, {s['ci95_strict_high']:.3f}] flexible {s['accuracy_flexible']:.3f}")


if __name__ == "__main__":
    run_stage(main)
