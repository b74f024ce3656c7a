"""Command line: ``imbalanceseg train | predict | card | evaluate | calibrate | estimate | suggest``."""
# (The docstring above is the --help description.)  Only the standard library is imported until a
# command runs: --help and argument errors answer without torch, MONAI, SciPy or SimpleITK, and each
# command imports what it needs (card reads the card without torch; evaluate imports MONAI only for
# surface Dice).  tests/test_cli_startup.py checks which modules get imported;
# Testing/Benchmarks/cli_startup.py measures the time.

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .presets import semi_supervised_choice  # torch-free


def _silent(*args, **kwargs) -> None:
    pass


def _event_writer(args: argparse.Namespace):
    """With ``--events``: the writer of JSON-line events on stdout (:mod:`imbalanceseglib.events`),
    on rank 0 only under torchrun; else None."""
    from .events import JsonLinesWriter
    if not getattr(args, "events", False) or int(os.environ.get("RANK", "0")) != 0:
        return None
    return JsonLinesWriter()


def _teller(args: argparse.Namespace, emit):
    """``print`` for the human log; with ``--events`` each line becomes a ``log`` event (stdout
    then holds only events), text meant for stderr still goes there. Under torchrun only rank 0 talks."""
    if int(os.environ.get("RANK", "0")) != 0:
        return _silent
    if emit is None:
        return print
    from . import events as ev

    def say(*parts, file=None, flush=False, sep=" ", end="\n") -> None:
        if file is not None and file is not sys.stdout:
            print(*parts, file=file, flush=flush, sep=sep, end=end)
            return
        emit(ev.log(sep.join(str(p) for p in parts)))
    return say


def _cmd_train(args: argparse.Namespace) -> int:
    from . import events as ev
    from .data import config_classes_from_data, folder_images, load_training_data, load_unlabeled_data
    from .train_config import TrainConfig
    from .training import train
    from .training_data import prepare_case, prepare_unlabeled_case

    emit = _event_writer(args)
    say = _teller(args, emit)
    cfg_path = Path(args.config)
    spec = json.loads(cfg_path.read_text())
    base = Path(args.data_root) if args.data_root else cfg_path.parent
    if args.data:  # a data folder in any supported layout replaces the config's data section
        spec["data"] = {"kind": "dataset", "folder": str(Path(args.data).resolve())}
    train_spec = dict(spec.get("train") or {})
    if "classes" not in train_spec:
        classes, modality = config_classes_from_data(spec.get("data") or {}, base)
        train_spec["classes"] = classes
        shown = [c["name"] + (f" (label value {c['label_value']})" if "label_value" in c else "") for c in classes]
        say(f"[train] classes from the data folder: {', '.join(shown)}", flush=True)
        if "modality" not in train_spec:
            train_spec["modality"] = modality
            say(f"[train] modality: {modality}" if modality else
                "[train] modality: the data folder does not state it; left empty in the model card "
                "(set \"modality\" in the config to record it)", flush=True)
    if args.iterations:
        train_spec["iterations"] = args.iterations
    if args.deep_supervision:  # on, keeping the config's levels and weights if it sets them
        deep = train_spec.get("deep_supervision", {})
        if isinstance(deep, dict):  # (anything else is refused by the config's validation, naming it)
            train_spec["deep_supervision"] = {**deep, "enabled": True}
    if args.context_labels:  # on, keeping the config's other context label settings if it sets them
        context = train_spec.get("context_labels", {})
        if isinstance(context, dict):  # (anything else is refused by the config's validation, naming it)
            train_spec["context_labels"] = {**context, "enabled": True}
    config = TrainConfig.from_dict(train_spec)
    say(f"[train] preparing data ({spec['data'].get('kind')})", flush=True)
    if emit:
        emit(ev.progress("prepare data", 0.0))
    t0 = time.perf_counter()
    train_pairs, val_pairs = load_training_data(spec["data"], base, log=lambda s: say(s, flush=True),
                                                classes=config.classes)
    train_cases = [prepare_case(i, l, config, n) for i, l, n in train_pairs]
    val_cases = [prepare_case(i, l, config, n) for i, l, n in val_pairs]
    unlabeled = load_unlabeled_data(spec["data"], base, log=lambda s: say(s, flush=True))
    if args.unlabeled:
        unlabeled += folder_images(Path(args.unlabeled))
    if unlabeled and not config.is_semi_supervised:
        message = (f"{len(unlabeled)} unlabelled images given but method {config.method!r} is "
                   f"supervised; choose {semi_supervised_choice()}")
        say(f"[train] error: {message}", file=sys.stderr)
        if emit:
            emit(ev.error("ValueError", message))
        return 2
    unlabeled_cases = [prepare_unlabeled_case(i, config, n) for i, n in unlabeled]
    say(f"[train] {len(train_cases)} training, {len(val_cases)} validation"
          + (f" and {len(unlabeled_cases)} unlabelled" if unlabeled_cases else "")
          + f" cases ready in {time.perf_counter() - t0:.1f} s", flush=True)
    if emit:
        emit(ev.progress("prepare data", 1.0))
    # (train() records the input profile from the prepared cases)
    path = train(config, train_cases, val_cases, Path(args.out), resume=not args.no_resume,
                 log=lambda s: say(s, flush=True), extra_card={"training_data": spec["data"]},
                 unlabeled_cases=unlabeled_cases or None, events=emit)
    say(f"[train] bundle written: {path}")
    if emit:
        emit(ev.done())
    return 0


def _prepare_output_folder(out: Path) -> List[Path]:
    """Create ``out`` (with missing parents) and prove it writable by creating and removing a
    probe file, before any inference. Returns the folders created here, outermost first (a
    failed run removes those that are still empty). Refuses, naming the folder: an output that
    is a file, a folder that cannot be created, or one where no file can be written."""
    import secrets

    out = Path(out)
    missing: List[Path] = []
    p = out.absolute()
    while not p.exists() and not p.is_symlink():
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise NotADirectoryError(f"output folder {out}: {p} is not a folder")
    created: List[Path] = []
    try:
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise OSError(f"cannot create the output folder {out}: no folder can be made in "
                              f"{folder.parent} ({exc.strerror or exc})") from exc
            created.append(folder)
        probe = out / f".imbalanceseg-write-test-{secrets.token_hex(4)}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"ok")
            finally:
                os.close(fd)
            probe.unlink()
        except OSError as exc:
            raise OSError(f"the output folder {out} is not writable: creating a file in it failed "
                          f"({exc.strerror or exc}); nothing was run") from exc
    except BaseException:
        _remove_empty_folders(created)
        raise
    return created


def _remove_empty_folders(created: List[Path]) -> None:
    """Remove the folders predict created (innermost first) that are still empty; never a
    folder that holds anything, never one that existed before."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            break  # not empty (or gone): its parents are not empty either


def _scene_writer():
    """For ``predict --scene``: the module's scene and snapshot writer (ImbalanceSegSlicer), which
    needs 3D Slicer's Python packages (the slicer-core wheel) and an offscreen OpenGL render
    window. Checked before any inference; a ValueError says what is missing."""
    try:
        import slicer  # noqa: F401
    except ImportError as exc:
        raise ValueError("--scene needs 3D Slicer's MRML Python packages, which are not importable here "
                         f"({exc}); install them with 'pip install slicer-core' (Python 3.11), or leave out "
                         "--scene (the .seg.nrrd opens in Slicer without it)") from exc
    try:
        from ImbalanceSegSlicer import demo
    except ImportError:
        module_dir = Path(__file__).resolve().parents[3] / "ImbalanceSeg"  # a source checkout
        if not (module_dir / "ImbalanceSegSlicer" / "demo.py").is_file():
            raise ValueError("--scene needs the ImbalanceSeg extension's ImbalanceSegSlicer package: put the "
                             "extension's ImbalanceSeg/ folder on PYTHONPATH") from None
        sys.path.insert(0, str(module_dir))
        from ImbalanceSegSlicer import demo
    from ImbalanceSegSlicer import rendering
    try:
        rendering.check_offscreen_rendering()
    except RuntimeError as exc:
        raise ValueError(f"--scene renders PNG snapshots: {exc}") from exc
    return demo


def _write_scene(demo, image, pred, bundle, out: Path, name: str, flag_threshold: float) -> List[Path]:
    """The demo's scene (.mrml) and snapshots for this prediction, sharing predict's file names
    (the scene's segmentation, maps and performance table are the files written above)."""
    from ImbalanceSegSlicer import scene as sc
    from ImbalanceSegSlicer.logic import ImbalanceSegLogic

    scene = sc.create_scene()
    volume = sc.volume_node_from_sitk(scene, image, name)
    result = ImbalanceSegLogic(scene).createResultNodes(volume, pred, bundle.classes, baseName=name,
                                                        flagThreshold=flag_threshold)
    names = {"volume": SCENE_VOLUME_FILE, "segmentation": SEGMENTATION_FILE,
             "probability": lambda i, _name: f"probability_{i:02d}.nrrd", "uncertainty": "uncertainty.nrrd",
             "class_table": "class_table.tsv", "performance": PERFORMANCE_FILE, "scene": "scene.mrml"}
    files = demo.save_result_files(scene, volume, result, out, names)
    files += demo.render_result_snapshots(scene, volume, result, out, prefix="")
    return files


SEGMENTATION_FILE = "segmentation.seg.nrrd"
PERFORMANCE_FILE = "performance_estimate.tsv"
FINDINGS_FILE = "input_checks.json"  # how the input differs from the training data (input_checks.Finding)
SCENE_VOLUME_FILE = "volume.nrrd"


def _cmd_predict(args: argparse.Namespace) -> int:
    # Everything that can be refused is refused before the output folder is touched (and the
    # argument checks before torch and MONAI are imported).
    if not 0.0 <= args.flag_threshold <= 1.0:
        raise ValueError(f"--flag-threshold must be between 0 and 1, got {args.flag_threshold}")
    tta = [t.strip() for t in args.tta.split(",") if t.strip()] if args.tta else None
    if args.stream and tta:
        raise ValueError("--tta and --stream cannot be combined yet")
    if args.agreement and tta:
        raise ValueError("--agreement compares the plain prediction with its views; it cannot be combined with "
                         "--tta")
    parse_agreement(args.agreement)  # refused before any work
    if args.scene and args.stream:
        raise ValueError("--scene builds the scene from every class's full probability map in memory, which "
                         "--stream avoids; leave out one of them (the .seg.nrrd opens in Slicer either way)")
    out = Path(args.output)
    if args.scene and (out / SCENE_VOLUME_FILE).resolve() == Path(args.input).resolve():
        raise ValueError(f"--scene writes the input volume to {out / SCENE_VOLUME_FILE}, which is the input "
                         "itself; choose another output folder")
    demo = _scene_writer() if args.scene else None
    from .bundle import load_bundle
    from .images import read_image
    from .inference import check_model_fits

    bundle = load_bundle(args.model)
    check_model_fits(bundle, modality=args.modality)
    image = read_image(args.input, "input volume")
    created = _prepare_output_folder(out)
    try:
        return _run_predict(args, bundle, image, out, tta, demo)
    except BaseException:
        _remove_empty_folders(created)
        raise


def _original_label_values(classes, label_image):
    """(classes with each ``value`` the original label value, label map with those values), or
    (classes, None) when the model was trained on the label values 0, 1, 2, ... themselves."""
    import SimpleITK as sitk

    from .datasets import card_label_values, indices_to_label_values

    values = card_label_values(classes)
    if values == list(range(len(classes))):
        return classes, None
    out = [{**{k: v for k, v in c.items() if k != "label_value"}, "value": lv, "index": c["value"]}
           for c, lv in zip(classes, values)]
    img = sitk.GetImageFromArray(indices_to_label_values(sitk.GetArrayViewFromImage(label_image), values))
    img.CopyInformation(label_image)
    return out, img


def _run_predict(args: argparse.Namespace, bundle, image, out: Path, tta, demo) -> int:
    import numpy as np
    import SimpleITK as sitk

    from .atomic import atomic_write_text
    from .images import write_image
    from .inference import predict
    from .segfile import performance_rows, write_performance_table, write_segmentation_nrrd

    def progress(stage: str, frac: float) -> None:
        print(f"\r[predict] {stage:<12} {100 * frac:5.1f}%", end="", flush=True)

    if args.stream:
        from .streaming import predict_streaming
        pred = predict_streaming(image, bundle, device=args.device, progress=progress, storage=args.storage,
                                 out_dir=out, sw_batch_size=args.sw_batch_size, layout=args.layout,
                                 precision=args.precision, workers=args.workers, engine=args.engine,
                                 agreement=parse_agreement(args.agreement))
        print()
        write_image(sitk.Cast(pred.label_image(), sitk.sitkUInt8), out / "labels.nrrd")
        for i, name in enumerate(pred.class_names):
            if args.storage == "uint8":  # written as stored: probability = value / 255
                img = sitk.GetImageFromArray(np.asarray(pred.stored[i]))
                img.CopyInformation(pred.reference)
                img.SetMetaData("ImbalanceSeg_probability_scale", "1/255")
                write_image(img, out / f"probability_{i:02d}.nrrd")
            else:
                write_image(pred.probability_image(i), out / f"probability_{i:02d}.nrrd")
        write_image(pred.uncertainty_image(), out / "uncertainty.nrrd")
        ex = pred.execution
        if ex:
            how = "the oneDNN engine" if ex.get("engine") == "onednn" else f"the module ({ex.get('layout')})"
            print(f"[predict] network ran as {how}, {ex.get('sw_batch_size')} window(s) per call, "
                  f"{ex.get('workers')} call(s) at once ({ex.get('source')})")
    else:
        pred = predict(image, bundle, device=args.device, progress=progress, tta=tta,
                       agreement=parse_agreement(args.agreement))
        print()
        write_image(sitk.Cast(pred.label_image(), sitk.sitkUInt8), out / "labels.nrrd")
        for i, name in enumerate(pred.class_names):
            write_image(pred.probability_image(i), out / f"probability_{i:02d}.nrrd")
        write_image(pred.uncertainty_image(), out / "uncertainty.nrrd")
    out_classes, out_labels = _original_label_values(bundle.classes, pred.label_image())
    if out_labels is not None:  # trained on non-consecutive label values: write those values back
        write_image(out_labels, out / "labels.nrrd")
    atomic_write_text(out / "classes.json", json.dumps(out_classes, indent=2))
    # What Slicer opens directly: the segmentation with the card's named, coloured segments, and
    # the label-free performance estimate with the module's columns.
    write_segmentation_nrrd(out_labels if out_labels is not None else pred.label_image(), out_classes,
                            out / SEGMENTATION_FILE)
    perf_rows = performance_rows(pred, args.flag_threshold)
    write_performance_table(perf_rows, out / PERFORMANCE_FILE)
    findings = [f.as_dict() for f in getattr(pred, "findings", [])]
    atomic_write_text(out / FINDINGS_FILE, json.dumps(findings, indent=2))
    written = [SEGMENTATION_FILE, PERFORMANCE_FILE, FINDINGS_FILE]
    if demo is not None:
        name = Path(args.input).name.split(".")[0] or "volume"
        scene_files = _write_scene(demo, image, pred, bundle, out, name, args.flag_threshold)
        written += sorted({f.name for f in scene_files} - set(written))
    for f in findings:
        print(f"[predict] {_said(f['severity'])}: {f['message']}")
    print(format_performance_rows(perf_rows, args.flag_threshold))
    print(f"[predict] wrote {out} ({', '.join(f'{k} {v:.2f}s' for k, v in pred.timings.items())})")
    print(f"[predict] for 3D Slicer: {', '.join(written)}")
    return 0


def _said(severity: str) -> str:
    """How a finding of the input checks is introduced on the console."""
    return {"warning": "warning", "caution": "caution"}.get(severity, "note")


def format_performance_rows(rows: List[Dict[str, Any]], threshold: float) -> str:
    """The label-free estimate as aligned text (``predict`` prints it)."""
    def f(v, spec):
        return "-" if v is None else format(v, spec)
    width = max([len("class")] + [len(r["Segment"]) for r in rows]) + 2
    checked = any(r.get("Agreement") is not None for r in rows)  # the stability check ran
    lines = [f"[predict] label-free performance estimate (review below estimated Dice {threshold:g}):",
             f"  {'class':<{width}}{'est. Dice':>10}{'volume ml':>11}{'expected ml':>13}"
             + (f"{'agreement':>11}" if checked else "") + f"  {'flag':<7}state"]
    for r in rows:
        lines.append(f"  {r['Segment']:<{width}}{f(r['Estimated Dice'], '.3f'):>10}{f(r['Volume'], '.3g'):>11}"
                     f"{f(r['Expected volume'], '.3g'):>13}"
                     + (f"{f(r.get('Agreement'), '.3f'):>11}" if checked else "")
                     + f"  {r['Flag'] or '-':<7}{r['State']}")
    return "\n".join(lines)


def _cmd_card(args: argparse.Namespace) -> int:
    from .container import read_card  # the card alone: no torch

    card = read_card(args.model)
    if args.json:
        print(json.dumps(card, indent=2))
        return 0
    print(f"{card['name']}: {card.get('description', '')}")
    pre = card["preprocessing"]
    print(f"  modality {pre.get('modality')}, spacing {pre.get('target_spacing')} mm, patch {pre.get('patch_size')}")
    val = card.get("validation", {}).get("per_class", {})
    demo = card.get("demo_case", {}).get("per_class", {})
    print(f"  {'class':<20}{'val Dice':>10}{'demo Dice':>11}")
    for c in card["classes"][1:]:
        v = val.get(c["name"], {}).get("dice")
        d = demo.get(c["name"], {}).get("dice")
        print(f"  {c['name']:<20}{'' if v is None else f'{v:.3f}':>10}{'' if d is None else f'{d:.3f}':>11}")
    return 0


def _cell(value: Optional[float], spec: str) -> str:
    return "" if value is None else format(value, spec)


def _read_classes(path: str) -> "Dict[int, str]":
    """``--classes``: a JSON list of {value, name}, or a mapping {"0": "background", "1": ...}
    (label value to name, as a data folder's classes.json); any problem names the file."""
    try:
        classes = json.loads(Path(path).read_text())
        if isinstance(classes, dict):
            from .datasets import parse_classes
            names = {c.label_value: c.name for c in parse_classes(classes, f"--classes {path}")
                     if str(c.label_value) in classes}
        else:
            names = {int(c["value"]): str(c["name"]) for c in classes}
    except OSError as exc:
        raise ValueError(f"--classes {path}: cannot be read ({exc.strerror or exc})") from exc
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"--classes {path}: expected a JSON list of {{\"value\": ..., \"name\": ...}} "
                         f"objects ({type(exc).__name__}: {exc})") from exc
    if not names:
        raise ValueError(f"--classes {path}: lists no classes")
    return names


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_folders, label_warnings

    names = None
    labels = args.labels
    requested_by = "--labels"
    ref = args.ref
    from .datasets import is_dataset_folder, open_dataset
    if is_dataset_folder(Path(ref)):  # a data folder: its label maps, and its classes unless given
        ds = open_dataset(Path(ref))
        folders = sorted({str(Path(c.label).parent) for c in ds.labelled_cases()})
        if len(folders) != 1:
            raise ValueError(f"--ref {ref}: the data folder's label maps are in {len(folders)} folders "
                             f"({', '.join(folders) or 'none'}); give the label folder itself")
        ref = folders[0]
        print(f"[evaluate] references: {ref} ({ds.describe()})")
        if not args.classes and labels is None:
            names = {int(c.get("label_value", c["value"])): c["name"] for c in ds.config_classes()}
            labels = sorted(v for v in names if v != 0)
            requested_by = f"the classes of {args.ref}"
    if args.classes:
        names = _read_classes(args.classes)
        if labels is None:
            labels = sorted(v for v in names if v != 0)
            requested_by = f"--classes {args.classes}"
        else:
            unknown = sorted({v for v in labels if v not in names})
            if unknown:
                raise ValueError(f"--labels {' '.join(map(str, unknown))} not in --classes {args.classes} "
                                 f"(its values: {', '.join(map(str, sorted(names)))})")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    t0 = time.perf_counter()
    out = evaluate_folders(args.pred, ref, args.out, labels=labels, class_names=names, metrics=metrics,
                           nsd_tolerance_mm=args.nsd_tolerance, allow_missing=args.allow_missing,
                           calibration=not args.no_calibration, n_bins=args.bins, near_radius_mm=args.near_radius,
                           max_uncertainty=args.max_uncertainty,
                           log=(lambda s: print(s, flush=True)) if args.verbose else None)
    if out["missing_predictions"]:
        print(f"[evaluate] {len(out['missing_predictions'])} case(s) without prediction evaluated as empty: "
              f"{', '.join(out['missing_predictions'])}")
    for line in label_warnings(out, requested_by, names):
        print(f"[evaluate] warning: {line}", file=sys.stderr, flush=True)
    print(f"[evaluate] {out['cases']} case(s) in {time.perf_counter() - t0:.1f} s")
    print(f"  {'class':<20}{'Dice':>8}{'HD95 mm':>10}{'NSD':>8}  policies")
    for row in out["summary"]:
        cells = [_cell(row.get(k), spec) for k, spec in (("dice_mean", ".3f"), ("hd95_mm_mean", ".2f"),
                                                          ("nsd_mean", ".3f"))]
        pol = ", ".join(f"{k[7:]} {v}" for k, v in row.items() if k.startswith("policy_") and v)
        print(f"  {row['name']:<20}{cells[0]:>8}{cells[1]:>10}{cells[2]:>8}  {pol}")
    if out["ece_pooled"] is not None:
        near = out["ece_near_pooled"]
        print(f"  ECE pooled over cases: {out['ece_pooled']:.4f} whole volume, "
              f"{'-' if near is None else f'{near:.4f}'} within {args.near_radius:g} mm of the structures")
    print(f"[evaluate] wrote {', '.join(str(p) for p in out['files'])}")
    return 0


def _image_folder(folder: str, what: str) -> "Dict[str, Path]":
    from .evaluation import case_id
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{what} folder {folder!r} does not exist")
    files = {case_id(p): p for p in sorted(path.iterdir()) if p.is_file() and case_id(p) is not None}
    if not files:
        raise ValueError(f"{what} folder {folder!r} holds no images (.nrrd, .nii, .nii.gz, .mha, .mhd)")
    return files


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from . import estimation as pe
    from . import events as ev
    import SimpleITK as sitk

    from .bundle import load_bundle, save_bundle
    from .datasets import card_label_values, label_values_to_indices, open_dataset
    from .images import read_image
    from .inference import working_grid_logits

    emit = _event_writer(args)
    say = _teller(args, emit)  # the human log: printed, or log events with --events
    src, out = Path(args.model), Path(args.out)
    if out.resolve() == src.resolve() and not args.force:
        raise ValueError("--out is the input model; write the calibrated bundle to a new file (or pass --force)")
    bundle = load_bundle(src)
    values = card_label_values(bundle.classes)
    mapped = values != list(range(len(values)))  # the model was trained on other label values
    if args.data:
        ds = open_dataset(Path(args.data))
        if ds.label_values != values:
            raise ValueError(f"--data {args.data}: its label values {ds.label_values} are not the model's {values}")
        images = {c.case_id: c.image for c in ds.labelled_cases()}
        labels = {c.case_id: c.label for c in ds.labelled_cases()}
        mapped = True
        say(f"[calibrate] {ds.describe()}", flush=True)
    elif args.images and args.labels:
        images = _image_folder(args.images, "image")
        labels = _image_folder(args.labels, "label")
    else:
        raise ValueError("give --data FOLDER, or --images and --labels")
    missing = sorted(set(images) - set(labels))
    if missing:
        raise ValueError(f"no label map for case(s) {', '.join(missing)} in {args.labels}")
    t0 = time.perf_counter()
    names: List[str] = []
    score_range = None
    cases = []
    if emit:
        emit(ev.progress("logits", 0.0))
    for cid, img_path in images.items():
        img = read_image(img_path, f"image {cid}")
        lab = read_image(labels[cid], f"label map {cid}")
        if mapped:  # original label values -> the model's class indices
            idx = sitk.GetImageFromArray(label_values_to_indices(
                sitk.GetArrayViewFromImage(lab), values, f"case {cid!r} ({labels[cid]})"))
            idx.CopyInformation(lab)
            lab = idx
        logits, lab_arr, _ = working_grid_logits(img, bundle, lab, device=args.device)
        if lab_arr.max() >= bundle.num_classes:
            raise ValueError(f"label map {cid} holds value {int(lab_arr.max())}, but the model has "
                             f"{bundle.num_classes} classes (0..{bundle.num_classes - 1})")
        cases.append((cid, logits, lab_arr))
        say(f"[calibrate] {cid}: logits on the model grid {'x'.join(map(str, logits.shape[1:]))}", flush=True)
        if emit:
            emit(ev.progress("logits", len(cases) / len(images)))
    if emit:
        emit(ev.progress("fit", 0.0))
    if args.confidence == "energy":
        score_range = pe.energy_range(lg for _, lg, _ in cases)
    # The logits go to the fit (not only T = 1 statistics): TS-ATC adds histograms at the
    # temperatures it fits, which may be any grid temperature.
    est = pe.fit_estimator([(lg, lab) for _, lg, lab in cases], method=args.method, class_specific=not args.global_,
                           confidence=args.confidence, score_range=score_range)
    errors = []
    for cid, logits, lab_arr in cases:
        truth = pe.case_statistics(logits, lab_arr, args.confidence, score_range, temperatures=False).true_dice()
        errors.append(np.abs(est.estimate(logits).metric_array("dice") - truth))
        names.append(cid)
    errors = np.array(errors)
    del cases
    card = dict(bundle.card)
    card["calibration"] = est.to_card()
    card["calibration"]["fitted_on"]["case_ids"] = names
    card["calibration_validation"] = {
        "note": "in-sample: mean absolute error of the estimated Dice on the cases the calibration was fitted on",
        "per_class_dice_mae": {n: (None if np.isnan(errors[:, k]).all() else float(np.nanmean(errors[:, k])))
                               for k, n in enumerate(bundle.class_names)}}
    written = save_bundle(out, card, bundle.network)
    if emit:
        emit(ev.progress("fit", 1.0))
        emit(ev.artifact("bundle", written))
    say(f"[calibrate] {args.method} ({'global' if args.global_ else 'class-specific'}, {args.confidence}) fitted on "
        f"{len(names)} case(s) in {time.perf_counter() - t0:.1f} s")
    say(f"  {'class':<22}{'Dice MAE (in-sample)':>22}")
    for n, v in card["calibration_validation"]["per_class_dice_mae"].items():
        say(f"  {n:<22}{'-' if v is None else f'{100 * v:.2f} points':>22}")
    say(f"[calibrate] wrote {written}")
    if emit:
        emit(ev.done())
    return 0


ESTIMATE_COLUMNS = ["case", "class", "estimated_dice", "estimated_sensitivity", "estimated_precision",
                    "predicted_ml", "expected_ml", "mean_confidence", "state", "flag", "agreement"]


def _cmd_estimate(args: argparse.Namespace) -> int:
    import csv
    import io

    import numpy as np
    import SimpleITK as sitk

    from . import estimation as pe
    from .atomic import atomic_path
    from .bundle import load_bundle
    from .datasets import is_dataset_folder, open_dataset
    from .images import read_image
    from .images import normalise_intensities
    from .inference import agreement_check, check_against_training, check_estimate, working_grid_logits

    if not 0.0 <= args.flag_threshold <= 1.0:
        raise ValueError(f"--flag-threshold must be between 0 and 1, got {args.flag_threshold}")
    views = parse_agreement(args.agreement)
    bundle = load_bundle(args.model)
    fg = bundle.class_names[1:]
    if args.rank_by != "worst" and args.rank_by not in fg:
        raise ValueError(f"--rank-by {args.rank_by!r} is not a class of the model; use 'worst' or one of {fg}")
    if is_dataset_folder(Path(args.images)):  # a data folder: its test and training images
        ds = open_dataset(Path(args.images))
        images = {c.case_id: c.image for c in ds.test_cases + ds.cases}
    else:
        images = _image_folder(args.images, "image")
    card = bundle.model_card
    estimator = pe.estimator_from_card(card.calibration, card.num_classes)
    import torch
    rows, estimates, keys = [], [], []
    for cid, path in images.items():
        image = read_image(path, f"image {cid}")
        logits, _, work = working_grid_logits(image, bundle, device=args.device)
        normalised = normalise_intensities(sitk.GetArrayViewFromImage(work), card.preprocessing.get("normalization", {}))
        findings = check_against_training(image, bundle, normalised)
        agree = None
        if views:
            roi = card.preprocessing.get("patch_size") or [min(s, 96) for s in normalised.shape]
            agree, more = agreement_check(bundle, normalised, torch.from_numpy(logits)[None], views, roi,
                                          device=args.device)
            findings += more
        logits = estimator.scale_logits(torch.from_numpy(logits)[None])[0].numpy()
        est = estimator.estimate(logits, bundle.class_names)
        voxel_ml = float(np.prod(work.GetSpacing())) / 1000.0
        findings = check_estimate(est, bundle, findings, voxel_ml, agree)
        estimates.append(est)
        dice, per_class = {}, {}
        for k, r in enumerate(est.classes):
            if k == 0:
                continue
            flag = pe.review_flag(r["state"], r["dice"], args.flag_threshold)
            rows.append([cid, bundle.class_names[k], r["dice"], r["sensitivity"], r["precision"],
                         r["predicted_voxels"] * voxel_ml, r["expected_voxels"] * voxel_ml, r["mean_confidence"],
                         r["state"], flag, r.get("agreement")])
            dice[bundle.class_names[k]] = r["dice"]
            per_class[bundle.class_names[k]] = r
        keys.append((cid, rank_key(per_class, args.rank_by, voxel_ml)))
        print(f"[estimate] {cid}: " + "  ".join(f"{n} {'-' if v is None else f'{v:.3f}'}" for n, v in dice.items()),
              flush=True)
        for f in findings:
            print(f"[estimate] {cid}: {_said(f.severity)}: {f.message}", flush=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(ESTIMATE_COLUMNS)
    for row in rows:
        writer.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])
    cohort = pe.cohort_estimate(estimates)
    for row in cohort[1:]:
        writer.writerow(["(cohort mean)", row["name"], "" if row["dice"] is None else f"{row['dice']:.6g}",
                         "" if row["sensitivity"] is None else f"{row['sensitivity']:.6g}",
                         "" if row["precision"] is None else f"{row['precision']:.6g}", "", "", "", "", "", ""])
    if args.csv:
        with atomic_path(Path(args.csv), suffix=".csv") as tmp:
            Path(tmp).write_text(buf.getvalue())
    ranked = sorted(keys, key=lambda item: item[1]["key"])
    what = "worst class" if args.rank_by == "worst" else args.rank_by
    print(f"[estimate] review order ({'uncalibrated' if estimator.method == 'none' else estimator.method + ' calibration'}): "
          f"cases with an unreliable estimate first, then the lowest estimated Dice of {what}, ties broken by the "
          f"expected mislabelled volume (larger first); cases where it is undefined last")
    for i, (cid, k) in enumerate(ranked, start=1):
        v = k["dice"]
        print(f"  {i:>3}. {cid:<30} {'-' if v is None else f'{v:.3f}'}  ({k['why']})")
    print("[estimate] cohort mean estimated Dice: " + "  ".join(
        f"{r['name']} {_cell(r['dice'], '.3f') or '-'}"
        for r in cohort[1:]))
    if args.csv:
        print(f"[estimate] wrote {args.csv}")
    return 0


#: ``suggest --strategy`` choices: :data:`imbalanceseglib.suggestive.STRATEGIES`, written out here
#: so that ``--help`` and argument errors need no torch (tests/test_cli_suggest.py checks they agree).
SUGGEST_STRATEGIES = ("suggestive", "uncertainty", "random")
#: ``suggest --out *.csv`` columns before the per-class uncertainties (``uncertainty <class>``) and
#: the reason.
SUGGEST_COLUMNS = ["rank", "scan", "chosen", "uncertainty", "representativeness_gain", "similar_to", "similarity"]


def _suggest_sources(images: str, labelled: Optional[str]):
    """(pool: case -> image file, labelled: case -> image file, what the pool is, in words) for
    ``suggest``: a folder of images, or a data folder (its images without a label map are the pool,
    those with one are labelled unless --labelled says otherwise); ``--labelled``: a folder of
    images or image files separated by commas."""
    from .datasets import is_dataset_folder, open_dataset
    from .evaluation import case_id
    ann: Dict[str, Path] = {}
    if is_dataset_folder(Path(images)):
        ds = open_dataset(Path(images))
        unlabelled = [c for c in ds.test_cases + ds.cases if c.label is None]
        pool = {c.case_id: c.image for c in unlabelled}
        if len(pool) != len(unlabelled):
            raise ValueError(f"--images {images}: case names repeat among the data folder's images without a "
                             f"label map")
        ann = {c.case_id: c.image for c in ds.labelled_cases()}
        where = f"the images without a label map in data folder {images} ({ds.describe()})"
        if not pool:
            raise ValueError(f"--images {images}: every image of the data folder has a label map; there is no "
                             "unlabelled scan to choose from")
    else:
        pool = _image_folder(images, "--images")
        where = f"folder {images}"
    if labelled:
        if Path(labelled).is_dir():
            ann = _image_folder(labelled, "--labelled")
        else:
            ann = {}
            for item in (t.strip() for t in labelled.split(",") if t.strip()):
                path = Path(item)
                if not path.is_file():
                    raise ValueError(f"--labelled {item}: no such file or folder")
                cid = case_id(path)
                if cid is None:
                    raise ValueError(f"--labelled {item}: not an image file (.nrrd, .nii, .nii.gz, .mha, .mhd)")
                if cid in ann:
                    raise ValueError(f"--labelled names two images of case {cid!r}: {ann[cid]} and {item}")
                ann[cid] = path
    both = sorted(set(pool) & set(ann))
    if both:
        raise ValueError(f"scan(s) {', '.join(both)} are both in the pool ({where}) and labelled: a labelled scan "
                         "is not annotated again; take it out of one of them")
    return pool, ann, where


def _suggest_outputs(outs: Optional[List[str]]) -> List[Path]:
    paths = [Path(o) for o in outs or []]
    for p in paths:
        if p.suffix.lower() not in (".csv", ".json"):
            raise ValueError(f"--out {p}: write .csv or .json (the suffix chooses the format)")
        if not p.parent.is_dir():
            raise ValueError(f"--out {p}: folder {p.parent} does not exist")
    return paths


def suggestion_table(rows: List[Any]) -> str:
    """``suggest``'s printed ranking: one line per scan, the chosen ones marked."""
    width = max([4] + [len(r.name) for r in rows])
    lines = [f"  {'rank':>4}  {'chosen':<6}  {'scan':<{width}}  {'uncertainty':>11}  {'gain':>8}  reason"]
    for r in rows:
        lines.append(f"  {r.rank:>4}  {'yes' if r.chosen else '':<6}  {r.name:<{width}}  "
                     f"{_cell(r.uncertainty, '.4f') or '-':>11}  {_cell(r.gain, '.4f') or '-':>8}  {r.reason}")
    return "\n".join(lines)


def _cmd_suggest(args: argparse.Namespace) -> int:
    import csv
    import io
    import math

    from .atomic import atomic_write_text
    from .bundle import load_bundle
    from .images import read_image
    from .suggestive import LazyScans, rank_for_annotation

    pool, labelled, where = _suggest_sources(args.images, args.labelled)
    if args.n < 1 or args.n > len(pool):
        raise ValueError(f"-n {args.n}: choose between 1 and the {len(pool)} unlabelled scan(s) of {where}")
    if not args.candidates_factor >= 1:
        raise ValueError(f"--candidates-factor must be at least 1, got {args.candidates_factor}")
    outs = _suggest_outputs(args.out)
    bundle = load_bundle(args.model)
    used = labelled if args.strategy == "suggestive" else {}
    print(f"[suggest] model {bundle.model_card.name!r}; {len(pool)} unlabelled scan(s): {where}; "
          f"{len(labelled)} labelled" + ("" if used or not labelled else " (only the suggestive strategy uses them)"))
    how = {"suggestive": f"the {min(len(pool), max(args.n, math.ceil(args.candidates_factor * args.n - 1e-9)))} "
                         "most uncertain are candidates, then the greedy max-cover of representativeness"
                         + (", the labelled scans counting as covered" if used else "")
                         + " (Yang et al., MICCAI 2017)",
           "uncertainty": "the most uncertain", "random": f"at random (seed {args.seed})"}[args.strategy]
    print(f"[suggest] strategy {args.strategy}: {args.n} chosen, {how}", flush=True)

    def reader(cid: str, path: Path):
        return lambda: read_image(path, f"image {cid} ({path})")

    def progress(stage: str, fraction: float) -> None:
        if stage != "select":
            print(f"[suggest] {fraction:4.0%} {stage}", flush=True)

    t0 = time.perf_counter()
    rows = rank_for_annotation(bundle, LazyScans({c: reader(c, p) for c, p in pool.items()}), args.n,
                               strategy=args.strategy,
                               annotated=LazyScans({c: reader(c, p) for c, p in used.items()}) if used else None,
                               seed=args.seed, progress=progress, candidates_factor=args.candidates_factor,
                               device=args.device)
    print(f"[suggest] ranking ({time.perf_counter() - t0:.1f} s): the {args.n} chosen first, then "
          + ("the rest in random order" if args.strategy == "random" else "the rest from most to least uncertain"))
    print(suggestion_table(rows))
    classes = list(bundle.class_names[1:])
    for out in outs:
        if out.suffix.lower() == ".json":
            doc = {"model": str(args.model), "model_name": bundle.model_card.name, "strategy": args.strategy,
                   "n": args.n, "seed": args.seed, "candidates_factor": args.candidates_factor, "pool": where,
                   "labelled": sorted(used), "classes": classes, "rows": [r.as_dict() for r in rows]}
            atomic_write_text(out, json.dumps(doc, indent=2) + "\n")
        else:
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(SUGGEST_COLUMNS + [f"uncertainty {c}" for c in classes] + ["reason"])
            for r in rows:
                writer.writerow([r.rank, r.name, "yes" if r.chosen else "no"]
                                + [_cell(v, ".6g") for v in (r.uncertainty, r.gain)]
                                + [r.similar_to or "", _cell(r.similarity, ".6g")]
                                + [_cell(r.per_class.get(c), ".6g") for c in classes] + [r.reason])
            atomic_write_text(out, buf.getvalue())
        print(f"[suggest] wrote {out}")
    return 0


def parse_agreement(text: Optional[str]) -> Optional[List[str]]:
    """``--agreement``: ``default`` (shift, gamma_low, gamma_high), ``members`` (the networks of
    an ensemble bundle), those view names, or test-time transforms (for models trained with
    them), comma-separated."""
    if not text:
        return None
    from .tta import AGREEMENT_VIEWS, STABILITY_VIEWS, TTA_TRANSFORMS
    views: List[str] = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item == "default":
            views += list(AGREEMENT_VIEWS)
        elif item == "members" or item in STABILITY_VIEWS or (item in TTA_TRANSFORMS and item != "identity"):
            views.append(item)
        else:
            raise ValueError(f"--agreement {item!r}: use default, members, {', '.join(STABILITY_VIEWS)} or "
                             f"test-time transforms other than identity "
                             f"({', '.join(t for t in TTA_TRANSFORMS if t != 'identity')})")
    return views or None


def rank_key(per_class: Dict[str, Dict[str, Any]], rank_by: str, voxel_ml: float) -> Dict[str, Any]:
    """Where a case goes in ``estimate``'s review order, and why.

    ``per_class``: the estimate rows of the case's foreground classes by name. The ranking
    class is ``rank_by`` or, for ``"worst"``, the class with the lowest estimated Dice (an
    unreliable class before any reliable one). Order: an unreliable ranking class first, then
    the estimated Dice (lowest first), ties broken by the expected mislabelled volume of that
    class (predicted + expected - 2 x expected true positives, in ml; larger first); a class
    whose Dice is undefined (absent) last."""
    def err(r):
        return max(0.0, (r["predicted_voxels"] + r["expected_voxels"] - 2 * r["expected_tp"]) * voxel_ml)

    def key(name):
        r = per_class[name]
        unreliable = r["state"].startswith("unreliable")
        return (0 if unreliable else 1, r["dice"] is None, r["dice"] if r["dice"] is not None else 0.0, -err(r), name)

    name = min(per_class, key=key) if rank_by == "worst" else rank_by
    r = per_class[name]
    why = f"{name}: " + ("Dice undefined (absent)" if r["dice"] is None else f"estimated Dice {r['dice']:.3f}")
    why += f", expected {err(r):.3g} ml mislabelled"
    if r["state"].startswith("unreliable"):
        why += f"; {r['state']}"
    return {"key": key(name), "dice": r["dice"], "class": name, "why": why}


AGREEMENT_HELP = ("also segment each case under these views and mark a class unreliable when its segmentation "
                  "changes (mean Dice with the plain prediction under 0.8): 'default' (shifted by a quarter window, "
                  "gamma 0.8 and 1.25), 'members' (each network of a semi-supervised model), or mirrorings such as "
                  "flip_x (only for models trained with them); one more network pass per view")


EVENTS_HELP = ("write progress as JSON lines on stdout, one event a line (see imbalanceseglib.events); "
               "the human log becomes 'log' events")


EVALUATE_DESCRIPTION = (
    "Evaluate every reference in --ref against the prediction of the same case in --pred. "
    "Which labels: --labels, else the non-zero values of --classes, else every non-zero label found. "
    "A label found in the maps but not evaluated (left out of --labels or --classes) gets a warning on "
    "stderr naming the label and the cases that hold it; a requested label found in no case (no reference, "
    "no prediction) gets a warning too, and both_empty rows (Dice undefined), since a rare class can be "
    "absent from a small test set. It is an error (exit status 2, nothing written) when --labels holds a "
    "value that --classes does not list or a negative one, or --classes is neither a list of {value, name} "
    "nor a mapping {\"0\": \"background\", ...}. "
    "Every error met while evaluating a case names the case and its files.")


PREDICT_DESCRIPTION = (
    "Segment one volume. Writes into --output: segmentation.seg.nrrd (3D Slicer's segmentation file: one "
    "named, coloured segment per class of the model card, with its terminology when the card has one), "
    "performance_estimate.tsv (the label-free per-class performance estimate, the columns of the module's "
    "performance table, with its .schema.tsv), labels.nrrd, probability_XX.nrrd per class, uncertainty.nrrd "
    "classes.json and input_checks.json (how the input differs from the model's training data: intensities, "
    "spacing, field of view, predicted volumes; each warning marks the classes it concerns unreliable). "
    "The estimate table is also printed. With --scene also scene.mrml (opens in Slicer with File > Add Data), volume.nrrd, "
    "class_table.tsv and axial/coronal/sagittal.png. A failed run removes the output folder again if it "
    "created it and it is still empty. A model trained on non-consecutive label values writes those "
    "values in labels.nrrd, the .seg.nrrd and classes.json (each class's \"index\" is its probability map).")


TRAIN_DESCRIPTION = (
    "Train a model from a JSON config ({\"train\": {...}, \"data\": {...}}). Data: a data folder in the "
    "layout you have (--data, or \"data\": {\"kind\": \"dataset\", \"folder\": DIR}): images/ labels/ "
    "classes.json (a list of {value, name, color} or a mapping {\"0\": \"background\", ...}), the "
    "nnU-Net v2 raw layout (dataset.json, imagesTr/<case>_0000.nii.gz, labelsTr/; single channel) or the "
    "Medical Segmentation Decathlon layout (dataset.json with 'training'). A train section without "
    "\"classes\" takes them, and the modality, from the data folder (the modality is left empty when "
    "the folder does not state it). Label values need not be consecutive (e.g. 0, 2, 5): the model trains "
    "on 0, 1, 2, records the values in its card, and predict writes the original values back. "
    "Float-coded integer labels (2.0) are accepted; other values are an error naming the case and file.")


SUGGEST_DESCRIPTION = (
    "Rank the unlabelled scans of --images for annotation with a trained model and choose -n of them "
    "(suggestive annotation, Yang et al., MICCAI 2017; imbalanceseglib.suggestive). Each scan's uncertainty "
    "comes from the model's own prediction: per foreground class the mean normalised entropy around where the "
    "class is predicted or plausible and 1 minus its label-free estimated Dice, every class weighing the same, so "
    "a small uncertain structure counts as much as a large one. The suggestive strategy takes the factor x n most "
    "uncertain scans as candidates and picks from them, greedily, the n that best represent the whole pool "
    "(cosine similarity of the network's deepest encoder features; scans like an already labelled one count as "
    "covered). Prints the ranking (rank, scan, uncertainty, representativeness gain, why) and writes it to --out "
    "(.csv or .json). Every image is read and checked before the network runs; one at a time, so the pool need "
    "not fit in memory. Errors name the problem: an empty folder, an unreadable file (named), -n outside 1 to the "
    "pool's size, a scan both in the pool and labelled, a file that is not a model bundle.")


def main(argv: Optional[List[str]] = None) -> int:
    from .estimation import REVIEW_THRESHOLD  # torch-free

    parser = argparse.ArgumentParser(prog="imbalanceseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model from a JSON config", description=TRAIN_DESCRIPTION)
    p.add_argument("config")
    p.add_argument("--out", required=True, help="output folder (checkpoint and bundle)")
    p.add_argument("--data", help="data folder to train on instead of the config's data section: "
                                  "images/ labels/ classes.json, nnU-Net v2 raw (dataset.json, imagesTr/, "
                                  "labelsTr/) or Medical Segmentation Decathlon (dataset.json with 'training'); "
                                  "classes and modality come from it when the config's train section has none")
    p.add_argument("--data-root", help="folder that data paths in the config are relative to (default: the config's folder)")
    p.add_argument("--iterations", type=int, help="override the number of iterations")
    p.add_argument("--deep-supervision", action="store_true",
                   help="train with deep supervision (auxiliary outputs at the coarser decoder levels, "
                        "nnU-Net's halving weights; the config's \"deep_supervision\" levels and weights are kept); "
                        "the same as \"deep_supervision\": {\"enabled\": true} in the config's train section. "
                        "Training only: the model predicts with the plain network")
    p.add_argument("--context-labels", action="store_true",
                   help="train with context label learning (CoLab: a task generator splits the background into "
                        "context classes and is meta-learned with the network; the config's \"context_labels\" "
                        "settings are kept); the same as \"context_labels\": {\"enabled\": true} in the config's "
                        "train section. The model predicts the config's classes (the context classes merged into "
                        "the background); not with semi-supervised methods or asymmetric mixup")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--unlabeled", help="folder of unlabelled images for a semi-supervised method "
                                       f"({semi_supervised_choice()})")
    p.add_argument("--events", action="store_true", help=EVENTS_HELP)
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("predict", help="segment one volume", description=PREDICT_DESCRIPTION)
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True, help="output folder (created if missing; refused before inference "
                                                    "when no file can be written in it)")
    p.add_argument("--scene", action="store_true",
                   help="also write the 3D Slicer scene (scene.mrml with the input volume, segmentation, maps and "
                        "tables) and axial/coronal/sagittal PNG snapshots; needs slicer-core")
    p.add_argument("--flag-threshold", type=float, default=REVIEW_THRESHOLD,
                   help=f"performance table: flag classes whose estimated Dice is below this "
                        f"(default: {REVIEW_THRESHOLD})")
    p.add_argument("--device", default="cpu")
    p.add_argument("--modality", help="modality of the input (e.g. CT, MR); refused if the model is for another")
    p.add_argument("--tta", help="test-time augmentation, comma-separated (e.g. identity,flip_x); merged per class "
                                 "(max for the card's rare classes, mean otherwise)")
    p.add_argument("--agreement", help=AGREEMENT_HELP)
    p.add_argument("--stream", action="store_true",
                   help="bounded-memory sliding window for big volumes: probabilities kept compactly "
                        "(--storage) and written tile by tile to probabilities.npy in the output folder")
    p.add_argument("--storage", default="uint8", choices=["uint8", "float16", "float32"],
                   help="with --stream: uint8 (probability x 255), float16 or float32")
    p.add_argument("--sw-batch-size", type=int, default=None,
                   help="windows per network call (with --stream; default: the fastest measured here)")
    p.add_argument("--layout", default="auto", choices=["auto", "contiguous", "channels_last"],
                   help="memory layout of the network (with --stream; default: the fastest measured here)")
    p.add_argument("--engine", default="auto", choices=["auto", "module", "onednn"],
                   help="with --stream: 'onednn' runs the bundled U-Nets on the CPU with every convolution in "
                        "oneDNN (same logits, faster), 'module' the network's own forward (default: the "
                        "fastest measured here)")
    p.add_argument("--workers", type=int, default=None,
                   help="with --stream: network calls run at once in threads (default: the fastest measured here)")
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                   help="with --stream: bfloat16 runs the network under autocast (faster where the hardware "
                        "has bfloat16 arithmetic; logits change by about 1 %%)")
    p.set_defaults(func=_cmd_predict)
    p = sub.add_parser("card", help="show a model card")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_card)
    p = sub.add_parser("evaluate", help="evaluate a folder of predictions against a folder of references",
                       description=EVALUATE_DESCRIPTION)
    p.add_argument("--pred", required=True, help="prediction folder (<case>.nrrd/.nii.gz/... or <case>/labels.nrrd)")
    p.add_argument("--ref", required=True, help="reference folder (<case>.nrrd/.nii.gz/...), or a data folder "
                   "(images/ labels/ classes.json, nnU-Net v2 raw, MSD): its label maps, and its classes "
                   "unless --classes or --labels is given")
    p.add_argument("--out", required=True, help="output folder (per_case.csv, summary.csv, policies.csv)")
    p.add_argument("--labels", type=int, nargs="+",
                   help="label values to evaluate (default: the non-zero values of --classes, else every "
                        "non-zero label found in the maps)")
    p.add_argument("--classes", help="JSON list of {value, name} (e.g. a bundle's or prediction's classes.json) "
                                     "or a mapping {\"0\": \"background\", \"1\": ...}: class names, "
                                     "and the labels to evaluate unless --labels is given")
    p.add_argument("--metrics", default="overlap,distance,nsd,detection",
                   help="comma-separated metric groups (default: %(default)s)")
    p.add_argument("--nsd-tolerance", type=float, default=2.0, help="surface Dice tolerance in mm (default: 2)")
    p.add_argument("--allow-missing", action="store_true",
                   help="evaluate a missing prediction as empty instead of stopping")
    p.add_argument("--no-calibration", action="store_true",
                   help="skip ECE/reliability/QU-BraTS even where probability_XX files sit beside labels")
    p.add_argument("--bins", type=int, default=15, help="equal-width ECE bins (default: 15)")
    p.add_argument("--near-radius", type=float, default=10.0,
                   help="mm around the structures for the near-structure ECE (default: 10)")
    p.add_argument("--max-uncertainty", type=float, default=1.0,
                   help="upper end of the uncertainty maps for QU-BraTS (default: 1, normalised entropy)")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=_cmd_evaluate)
    p = sub.add_parser("calibrate", help="fit calibration on labelled validation cases and write a new bundle")
    p.add_argument("--model", required=True)
    p.add_argument("--images", help="folder of validation images (<case>.nrrd/.nii.gz/...)")
    p.add_argument("--labels", help="folder of their label maps (same case names; the original label values "
                                    "when the model was trained on non-consecutive ones)")
    p.add_argument("--data", help="instead of --images/--labels: a data folder (images/ labels/ classes.json, "
                                  "nnU-Net v2 raw or MSD) whose labelled cases are the validation cases")
    p.add_argument("--method", default="ts-atc", choices=["none", "ts", "doc", "atc", "ts-atc"])
    p.add_argument("--global", dest="global_", action="store_true",
                   help="one parameter for all classes instead of one per class")
    p.add_argument("--confidence", default="mcp", choices=["mcp", "entropy", "energy", "doctor"])
    p.add_argument("--out", required=True, help="calibrated bundle to write (never the input model)")
    p.add_argument("--force", action="store_true", help="allow --out to replace the input model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--events", action="store_true", help=EVENTS_HELP)
    p.set_defaults(func=_cmd_calibrate)
    p = sub.add_parser("estimate", help="estimate per-class performance of unlabelled scans and rank them")
    p.add_argument("--model", required=True)
    p.add_argument("--images", required=True, help="folder of unlabelled images, or a data folder (nnU-Net v2 "
                                                   "raw, MSD, images/ + classes.json): its test and training images")
    p.add_argument("--csv", help="per-case, per-class estimates (CSV)")
    p.add_argument("--flag-threshold", type=float, default=REVIEW_THRESHOLD,
                   help="flag classes below this estimated Dice")
    p.add_argument("--rank-by", default="worst", help="class name to rank by, or 'worst' (default)")
    p.add_argument("--agreement", help=AGREEMENT_HELP)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_estimate)
    p = sub.add_parser("suggest", help="choose which unlabelled scans to annotate next (suggestive annotation)",
                       description=SUGGEST_DESCRIPTION)
    p.add_argument("--model", required=True)
    p.add_argument("--images", required=True, help="folder of unlabelled images (the pool), or a data folder "
                                                   "(nnU-Net v2 raw, MSD, images/ + classes.json): its images "
                                                   "without a label map are the pool, those with one are labelled")
    p.add_argument("--labelled", help="scans already annotated: a folder of images, or image files separated by "
                                      "commas (default: none; for a data folder its labelled images); only the "
                                      "suggestive strategy uses them")
    p.add_argument("-n", type=int, required=True, help="how many scans to choose")
    p.add_argument("--strategy", default="suggestive", choices=SUGGEST_STRATEGIES,
                   help="suggestive (default): uncertainty, then representativeness; uncertainty: the n most "
                        "uncertain; random: n at random (--seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random strategy (default: 0)")
    p.add_argument("--candidates-factor", type=float, default=2.0,
                   help="suggestive: the candidates are the factor x n most uncertain scans (default: 2)")
    p.add_argument("--out", action="append", help="write the ranking to this .csv or .json file (may be given "
                                                  "twice, once for each)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_suggest)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        emit = _event_writer(args)
        if emit is not None:  # --events: the reader gets the failure as an event too
            from .events import error_from
            emit(error_from(exc))
        if not isinstance(exc, (ValueError, OSError, FloatingPointError)):
            raise
        print(f"imbalanceseg: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
