"""The language server's record worker (``python -m hexray.record_worker``): ``hexray_core.record.worker`` with the
dictionaries of ``dict`` record options (``--dict``: stored features, feature interventions) read by the replay
side, which the recorder never imports; the composition root joins the two here."""

from __future__ import annotations


def dictionaries(recorder, paths) -> dict:
    """``recorder.record`` keywords for these dictionaries: their features stored, feature interventions served."""
    from hexray_core.dataset.record_features import feature_dictionaries, load_dictionaries, run_extra

    dsets = load_dictionaries(paths)
    return {"features": feature_dictionaries(dsets), "extra": run_extra(recorder, dsets)}


def main() -> None:
    from hexray_core.record.worker import main as worker_main

    worker_main(dictionaries)


if __name__ == "__main__":
    main()
