"""Loader for the local PIQA task (called by lm-eval through `custom_dataset` in piqa.yaml)."""


def load_dataset(**kwargs):
    """A datasets.DatasetDict with the 1838 PIQA validation items (goal, sol1, sol2, label)."""
    import datasets

    from rabit.eval.piqa import load_piqa

    items = load_piqa()
    cols = {k: [it[k] for it in items] for k in ("goal", "sol1", "sol2", "label")}
    return datasets.DatasetDict({"validation": datasets.Dataset.from_dict(cols)})
