"""The structured event stream (imbalanceseglib.events) that ``imbalanceseg train|calibrate --events``,
the trainers and the segmentation worker write, and that the background jobs read (#17)."""

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from imbalanceseglib import events as ev
from imbalanceseglib.bundle import load_bundle
from imbalanceseglib.cli import main
from imbalanceseglib.training import TrainConfig, prepare_case, prepare_unlabeled_case, train

from test_logic_training import CLASSES


def _train_config(**overrides):
    d = dict(name="ev_model", classes=CLASSES, target_spacing=[1.0, 1.0, 2.5], patch_size=[16, 16, 8],
             features=[4, 8], iterations=4, batch_size=1, learning_rate=1e-2, val_every=2, checkpoint_every=2,
             log_every=2, normalization={"scheme": "percentile_zscore"}, seed=1, method="dice_ce")
    d.update(overrides)
    return d


def _events_of(text):
    lines = [line for line in text.splitlines() if line.strip()]
    events = [ev.parse_event(line) for line in lines]
    assert None not in events, [line for line, e in zip(lines, events) if e is None]  # stdout: events only
    for line in lines:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c} in {line}"))
    return events


def test_event_lines_are_strict_json_and_round_trip():
    writer_out = []

    class Stream:
        def write(self, text):
            writer_out.append(text)

        def flush(self):
            pass

    write = ev.JsonLinesWriter(Stream())
    write(ev.iteration(3, 10, float("nan")))
    write(ev.validation(3, {"A": 0.5, "B": None}))
    write(ev.artifact("bundle", "/x/y.imbseg"))
    write(ev.warning("never_learned", "[train] never learned: B", ("B",)))
    assert all(t.endswith("\n") and t.count("\n") == 1 for t in writer_out)
    parsed = [ev.parse_event(t) for t in writer_out]
    assert parsed == [{"event": "iteration", "iteration": 3, "total": 10, "loss": None},
                      {"event": "validation", "iteration": 3, "dice": {"A": 0.5, "B": None}},
                      {"event": "artifact", "kind": "bundle", "path": "/x/y.imbseg"},
                      {"event": "warning", "kind": "never_learned", "message": "[train] never learned: B",
                       "classes": ["B"]}]
    assert ev.parse_event("iter 4/600 loss 0.8") is None and ev.parse_event('{"no": "event"}') is None
    assert ev.parse_event("{broken") is None and ev.parse_event("[1, 2]") is None
    with pytest.raises(ValueError, match="unknown event kind"):
        write({"event": "whatever"})
    with pytest.raises(ValueError, match="artifact kind"):
        ev.artifact("picture", "/x.png")
    with pytest.raises(ValueError, match="warning kind"):
        ev.warning("gloomy", "?")


def _folders(tmp_path, synthetic, val=True):
    for sub in ("images", "labels") + (("val_images", "val_labels") if val else ()):
        (tmp_path / sub).mkdir()
    for prefix in ("", "val_") if val else ("",):
        sitk.WriteImage(synthetic["image"], str(tmp_path / f"{prefix}images" / "case0.nrrd"))
        sitk.WriteImage(synthetic["label"], str(tmp_path / f"{prefix}labels" / "case0.nrrd"))


def test_cli_train_and_calibrate_write_only_events_on_stdout(tmp_path, synthetic, capsys):
    _folders(tmp_path, synthetic)
    cfg = {"data": {"kind": "folders", "images": "images", "labels": "labels", "val_images": "val_images",
                    "val_labels": "val_labels"}, "train": _train_config()}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["train", str(tmp_path / "config.json"), "--out", str(tmp_path / "out"), "--events"]) == 0
    events = _events_of(capsys.readouterr().out)
    kinds = [e["event"] for e in events]
    bundle = tmp_path / "out" / "ev_model.imbseg"
    assert events[0] == ev.log("[train] preparing data (folders)")
    assert events[-1] == {"event": "done"}
    assert [e for e in events if e["event"] == "progress"] == [ev.progress("prepare data", 0.0),
                                                               ev.progress("prepare data", 1.0)]
    assert [e for e in events if e["event"] == "artifact"] == [
        ev.artifact("checkpoint", tmp_path / "out" / "checkpoint.pt"), ev.artifact("checkpoint", tmp_path / "out" /
                                                                                  "checkpoint.pt"),
        ev.artifact("bundle", bundle)]
    iterations = [e for e in events if e["event"] == "iteration"]
    vals = [e for e in events if e["event"] == "validation"]
    assert [(e["iteration"], e["total"]) for e in iterations] == [(2, 4), (4, 4)]
    assert [e["iteration"] for e in vals] == [2, 4] and set(vals[0]["dice"]) == {"Sphere A", "Sphere B"}
    # the numbers are the ones the trainer recorded in the card
    history = load_bundle(bundle).card["training"]["history"]
    assert [e["loss"] for e in iterations] == [h["loss"] for h in history if "loss" in h]
    assert [e["dice"] for e in vals] == [{k: v["dice"] for k, v in h["val"].items()} for h in history if "val" in h]
    # the human log is still there, as log events, in order with the rest
    logs = [e["message"] for e in events if e["event"] == "log"]
    assert any(m.startswith("iter      2/4  loss") for m in logs) and f"[train] bundle written: {bundle}" in logs
    assert kinds.index("iteration") < kinds.index("validation") < kinds.index("artifact")

    calibrated = tmp_path / "out" / "calibrated.imbseg"
    assert main(["calibrate", "--model", str(bundle), "--images", str(tmp_path / "val_images"), "--labels",
                 str(tmp_path / "val_labels"), "--out", str(calibrated), "--events"]) == 0
    events = _events_of(capsys.readouterr().out)
    assert [e for e in events if e["event"] == "progress"] == [
        ev.progress("logits", 0.0), ev.progress("logits", 1.0), ev.progress("fit", 0.0), ev.progress("fit", 1.0)]
    assert [e for e in events if e["event"] == "artifact"] == [ev.artifact("bundle", calibrated)]
    assert events[-1] == {"event": "done"} and calibrated.is_file()
    assert ev.log(f"[calibrate] wrote {calibrated}") in events

    # without --events the output is the human log, as before
    assert main(["calibrate", "--model", str(bundle), "--images", str(tmp_path / "val_images"), "--labels",
                 str(tmp_path / "val_labels"), "--out", str(tmp_path / "out" / "again.imbseg")]) == 0
    out = capsys.readouterr().out
    assert f"[calibrate] wrote {tmp_path / 'out' / 'again.imbseg'}" in out and '"event"' not in out


def test_cli_failures_are_error_events(tmp_path, synthetic, capsys):
    _folders(tmp_path, synthetic, val=False)
    (tmp_path / "unlabelled").mkdir()
    sitk.WriteImage(synthetic["image"], str(tmp_path / "unlabelled" / "u0.nrrd"))
    cfg = {"data": {"kind": "folders", "images": "images", "labels": "labels"}, "train": _train_config()}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["train", str(tmp_path / "config.json"), "--out", str(tmp_path / "out"), "--events",
                 "--unlabeled", str(tmp_path / "unlabelled")]) == 2
    captured = capsys.readouterr()
    events = _events_of(captured.out)
    assert events[-1]["event"] == "error" and "supervised; choose cps" in events[-1]["message"]
    assert "supervised" in captured.err
    model = tmp_path / "m.imbseg"
    model.write_bytes(b"x")
    assert main(["calibrate", "--model", str(model), "--images", str(tmp_path / "images"), "--labels",
                 str(tmp_path / "labels"), "--out", str(model), "--events"]) == 2
    events = _events_of(capsys.readouterr().out)
    assert events == [ev.error("ValueError", "--out is the input model; write the calibrated bundle to a new "
                                             "file (or pass --force)")]


def test_trainers_send_events_only_when_asked(synthetic, tmp_path):
    config = TrainConfig.from_dict(_train_config(method="cps", iterations=2, val_every=2, checkpoint_every=2))
    cases = [prepare_case(synthetic["image"], synthetic["label"], config, "c0")]
    unlabelled = [prepare_unlabeled_case(synthetic["image"], config, "u0")]
    got = []
    path = train(config, cases, cases, tmp_path / "semi", unlabeled_cases=unlabelled, log=lambda s: None,
                 events=got.append)
    # after the bundle, a warning event for each class the final validation shows never learned
    kinds = [e["event"] for e in got]
    assert kinds[:4] == ["iteration", "validation", "artifact", "artifact"] and set(kinds[4:]) <= {"warning"}
    assert got[0]["iteration"] == 2 and math.isfinite(got[0]["loss"]) and got[3] == ev.artifact("bundle", path)
    card = load_bundle(path).card["training"]
    for kind in ("never_learned", "barely_learned"):
        assert [e["classes"] for e in got[4:] if e["kind"] == kind] == ([card[kind]] if card[kind] else [])
    history = load_bundle(path).card["training"]["history"]
    assert got[0]["loss"] == history[0]["loss"]
    # events=None (the default): the same training, nothing sent, same weights
    again = train(config, cases, cases, tmp_path / "semi2", unlabeled_cases=unlabelled, log=lambda s: None)
    a, b = load_bundle(path).network.state_dict(), load_bundle(again).network.state_dict()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
