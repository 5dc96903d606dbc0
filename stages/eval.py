"""Stages `eval_*`: zero-shot GSM8K accuracy of one arm (kd/config/arms.py) via lm-eval."""

import kd.core.portable; kd.core.portable.apply()  # noqa: E702 - compute.portable: ISA caps, before torch loads

import click

from kd.core.entry import run_stage


@click.command()
@click.argument("model")
def main(model):
    from kd.config.arms import arm_names
    from kd.config.params import load_params
    from kd.core.names import stage_arg
    from kd.data.prompting import check_context
    from kd.eval.evaluate import resolve_model

    p = load_params()
    stage_arg("model", model, arm_names(p["prompting"]["strategies"]), "arm")  # before any path use
    resolve_model(model, p)  # a bad name fails here, before torch / lm-eval are imported
    check_context(p, ".", uses=("eval",), eval_models=[model])  # before the weights load

    from kd.eval.evaluate import evaluate_model

    s = evaluate_model(model, p)
    from kd.core.environment import record_environment

    record_environment(f"eval-{model}")  # environment/eval-<m>.json: the lineage beyond params + code
    print(f"eval@{model}: {s['items']} items, {s['tokens']} tokens, {s['seconds']:.1f} s; "
          f"accuracy strict {s['accuracy_strict']:.3f} [{s['ci95_strict_low']:.3f}, {s['ci95_strict_high']:.3f}]"
          f" flexible {s['accuracy_flexible']:.3f}")


if __name__ == "__main__":
    run_stage(main)
