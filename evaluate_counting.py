"""Count every image of an FSC-147 split and report the literature's metrics.

    python evaluate_counting.py --checkpoint RUN/checkpoint-best --data_root /path/FSC147 --split val
    python evaluate_counting.py --checkpoint RUN/checkpoint-best --data_root DIR --split test \
        --output_dir eval_test --batch_size 16 --save_overlays 8
    python evaluate_counting.py --checkpoint RUN/checkpoint-best --data_root /path/FSC147 --split test --protocol exemplar
    python evaluate_counting.py --checkpoint RUN/checkpoint-best --data_root /path/FSC147 --split test \
        --tune_threshold 0.3,0.5,0.7,0.9      # the done threshold chosen on val, then test counted with it
    python evaluate_counting.py --checkpoint RUN/checkpoint-best --data_root /path/FSC147 --split test \
        --points_per_step auto --tiles auto   # dense images: several points per forward, crops where objects are tiny

Protocols (`summary.protocol` in results.json), i.e. what the counter is given at test time:
  text      (default) the image and the class name only: marks are sized from the model's own estimate of
            the objects' size. Compare with text-prompt results (CountSE, T2ICount, CountGD text-only, ...).
  exemplar  also the three exemplar boxes of each image, used only to size the marks. Compare with
            exemplar-prompt results (CountGD with exemplars, GeCo, ...).

Writes OUTPUT_DIR/results.json ({"summary": {...}, "images": [...]}) and prints a summary table.
Metrics (as in the FSC-147 literature; ground truth = number of annotated points):
  MAE = mean |pred - gt|, RMSE = sqrt(mean (pred - gt)^2), NAE = mean |pred - gt| / gt;
  localisation precision / recall / F1: predicted points matched one-to-one to ground-truth points
  (scipy.optimize.linear_sum_assignment on distances) within a radius, by default half the mean
  exemplar box size of the image (an evaluation-side use of the boxes under either protocol).
  says_total: where the annotation lists every object (`all_points`, written for synthetic images with
  distractors), the share of the images holding other classes' objects (n_with_distractors of them) whose
  count equals the number of objects of all classes: a counter that ignores the class name scores high;
  points_on_other_class: there, the share of the predicted points that match no named object but one of
  another class (the prompt's class confused with a neighbour's). per_class: images, exact, MAE, bias per class.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from count_objects import (FROM_CHECKPOINT, MAX_COUNT, POINTS_PER_STEP_HELP, PROTOCOLS, TILES_HELP, CountResult,
                           CountSettings, base_override, count_images, points_per_step_errors, points_per_step_for,
                           tiles_for, tiles_option_errors)
from cli import UsageError, arg, parse_config, write_json_atomic
from dataset_fsc147 import FSC147Dataset, draw_marks, mark_radius, object_size, unnamed_points
from model_loading import load_checkpoint


@dataclass
class EvalConfig:
    checkpoint: str = arg("", "checkpoint folder written by training (e.g. RUN/checkpoint-best)")
    data_root: str = arg("", "FSC-147 root folder")
    split: str = arg("val", "split to count: val or test (or train)")
    output_dir: str = arg("", "where results.json and overlays go (default: CHECKPOINT/eval-<split>)")
    protocol: str = arg("text", "text (image and class name only; marks sized from the model's own estimate) or "
                        "exemplar (marks sized from the exemplar boxes); see the top of this help")
    batch_size: int = arg(8, "images counted at once (each at its own step)")
    done_threshold: float = arg(0.5, "stop counting an image when sigmoid(done) exceeds this")
    max_count: int = arg(MAX_COUNT, "stop counting an image after this many points (reported as capped); the default "
                         "covers FSC-147's densest image (3,731 objects)")
    points_per_step: str = arg(FROM_CHECKPOINT, POINTS_PER_STEP_HELP + "; forwards_per_image in results.json says "
                               "what it cost")
    duplicate_guard: bool = arg(True, "a point within half an object size of a counted one is not counted: the loop takes "
                                "the model's next candidate or stops the image (stopped_on_duplicates)")
    tiles: str = arg(FROM_CHECKPOINT, TILES_HELP + "; results.json records tiles and forwards_per_image per image")
    tune_threshold: str = arg("", "comma-separated done thresholds, e.g. 0.5,0.7,0.9,0.95,0.98: each is tried "
                              "on --tune_split, counted as --split will be (the same --points_per_step and --tiles), "
                              "and --split is counted at the one with the lowest MAE there, a tie going to the one "
                              "nearest --done_threshold (results.json records both); empty: --done_threshold")
    tune_split: str = arg("val", "the split the done threshold is chosen on (never the split being reported)")
    tune_images: int = arg(0, "images of --tune_split counted per threshold, a fixed sample spread over its classes "
                           "(0: all of them)")
    max_images: int = arg(0, "count only N images of the split, a fixed sample spread over its classes (0: all); "
                          "results.json then says subset and not complete")
    match_radius: float = arg(0.0, "localisation match radius in pixels (0: half the image's mean exemplar box size)")
    save_overlays: int = arg(0, "write PNGs of the first K images: predicted marks | ground-truth dots")
    device: str = arg("auto", "auto, cpu or cuda")
    model_name_or_path: str = arg("", "the base model's folder or hub id (default: the path saved in the checkpoint's "
                                  "config.json; give it when the weights moved)")


def validate_eval_config(cfg: EvalConfig) -> list[str]:
    errors = [f"--{n} is required" for n in ("checkpoint", "data_root") if not getattr(cfg, n)]
    if cfg.batch_size < 1 or cfg.max_count < 1:
        errors.append("--batch_size and --max_count must be >= 1")
    if not 0 < cfg.done_threshold < 1:
        errors.append("--done_threshold must be in (0, 1)")
    if cfg.protocol not in PROTOCOLS:
        errors.append(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {cfg.protocol!r}")
    errors += points_per_step_errors(cfg.points_per_step) + tiles_option_errors(cfg.tiles)
    if cfg.max_images < 0 or cfg.save_overlays < 0 or cfg.match_radius < 0 or cfg.tune_images < 0:
        errors.append("--max_images, --save_overlays, --match_radius and --tune_images must be >= 0")
    try:
        if not all(0 < t < 1 for t in parse_thresholds(cfg.tune_threshold)):
            errors.append("--tune_threshold values must be in (0, 1)")
    except ValueError:
        errors.append(f"--tune_threshold must be comma-separated numbers, got {cfg.tune_threshold!r}")
    if cfg.tune_threshold and cfg.tune_split == cfg.split:
        errors.append(f"--tune_split {cfg.tune_split!r} is the split being reported: choose the threshold on another "
                      "one (val), or the reported numbers are tuned on their own test images")
    return errors


def parse_thresholds(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def pick_threshold(maes: dict[float, float], default: float = 0.5) -> float:
    """The threshold with the lowest val MAE; among thresholds tied on it (val MAEs are multiples of 1 / images, so
    ties are common), the one nearest `default` (the untuned --done_threshold), then the lower. Ties carry no
    evidence for stopping earlier, which the first-listed, lowest threshold would assume."""
    best = min(maes.values())
    tied = [t for t, mae in maes.items() if mae - best < 1e-9]
    return min(tied, key=lambda t: (round(abs(t - default), 9), t))  # rounded: |0.7 - 0.5| < |0.3 - 0.5| in floats


# ----------------------------------------------------------------------------- metrics


def matched_mask(pred: np.ndarray, gt: np.ndarray, radius: float) -> np.ndarray:
    """(P,) bool: which predicted points a one-to-one matching with the ground-truth points within `radius` uses
    (the matching with the most pairs)."""
    pred, gt = np.asarray(pred, dtype=np.float64).reshape(-1, 2), np.asarray(gt, dtype=np.float64).reshape(-1, 2)
    mask = np.zeros(len(pred), dtype=bool)
    if len(pred) == 0 or len(gt) == 0:
        return mask
    from scipy.optimize import linear_sum_assignment

    dist = np.linalg.norm(pred[:, None] - gt[None], axis=-1)  # (P, G)
    # Pairs beyond the radius cost more than any pair within it, so the assignment maximises matches.
    cost = np.where(dist <= radius, dist, radius * 10 + dist.max() * len(pred) + 1.0)
    rows, cols = linear_sum_assignment(cost)
    mask[rows[dist[rows, cols] <= radius]] = True
    return mask


def match_points(pred: np.ndarray, gt: np.ndarray, radius: float) -> int:
    """Number of one-to-one matches between predicted and ground-truth points within `radius`."""
    return int(matched_mask(pred, gt, radius).sum())


def other_class_points(pred: np.ndarray, gt: np.ndarray, all_points: np.ndarray, radius: float) -> int:
    """Predicted points that match no named object but do match (one-to-one, within `radius`) an object of another
    class: the prompt's class confused with a neighbour's. `all_points` lists every object, the named ones too."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 2)
    gt, every = np.asarray(gt, dtype=np.float64).reshape(-1, 2), np.asarray(all_points, dtype=np.float64).reshape(-1, 2)
    every = unnamed_points(gt, every)  # the other classes' objects
    spare = pred[~matched_mask(pred, gt, radius)]
    return match_points(spare, every, radius)


def default_radius(boxes: np.ndarray, width: int, height: int) -> float:
    """Half the mean exemplar box size ((w + h) / 2), or a mark radius when there are no boxes."""
    if len(boxes):
        return object_size(boxes, width, height) / 2
    return float(mark_radius(width, height))


def summarize(records: list[dict], elapsed_s: float) -> dict:
    """Dataset-level metrics from per-image records (pred_count, gt_count, n_matched...)."""
    if not records:
        raise UsageError("no image was counted")
    pred = np.array([r["pred_count"] for r in records], dtype=np.float64)
    gt = np.array([r["gt_count"] for r in records], dtype=np.float64)
    err = pred - gt
    matched = sum(r["n_matched"] for r in records)
    precision = matched / pred.sum() if pred.sum() else 0.0
    recall = matched / gt.sum() if gt.sum() else 0.0
    return {
        "n_images": len(records),
        "mae": float(np.abs(err).mean()),
        "rmse": float(math.sqrt((err ** 2).mean())),
        "nae": float((np.abs(err) / np.maximum(gt, 1)).mean()),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0,
        "n_capped": int(sum(r["capped"] for r in records)),
        "n_stopped_on_duplicates": int(sum(r.get("stopped_on_duplicates", False) for r in records)),
        "mean_gt": float(gt.mean()),
        "within_1": float(np.mean(np.abs(err) <= 1)),
        "forwards_per_image": float(np.mean([r.get("steps", 0) for r in records])),
        "images_per_s": len(records) / elapsed_s if elapsed_s > 0 else float("nan"),
        **says_total(records), **size_error(records), **on_other_class(records), "per_class": per_class(records),
    }


def per_class(records: list[dict]) -> dict:
    """{class name: images, exact, MAE, mean pred - gt} over the images that name it."""
    out = {}
    for name in sorted({r["class_name"] for r in records if r.get("class_name") is not None}):
        err = np.array([r["pred_count"] - r["gt_count"] for r in records if r.get("class_name") == name],
                       dtype=np.float64)
        out[name] = {"n_images": int(len(err)), "exact_acc": float(np.mean(err == 0)), "mae": float(np.abs(err).mean()),
                     "bias": float(err.mean())}
    return out


def on_other_class(records: list[dict]) -> dict:
    """Where every object is listed: the share of the predicted points that sit on another class's object, and
    their number; {} otherwise."""
    with_all = [r for r in records if r.get("n_on_other_class") is not None]
    if not with_all:
        return {}
    n_other, n_pred = sum(r["n_on_other_class"] for r in with_all), sum(r["pred_count"] for r in with_all)
    return {"points_on_other_class": n_other / n_pred if n_pred else 0.0, "n_points_on_other_class": int(n_other)}


def says_total(records: list[dict]) -> dict:
    """Share of the images holding objects of other classes (`all_count` above `gt_count`) whose count equals the
    number of objects of every class, and how many such images there are; {} when no image lists every object.
    Images where no distractor fitted are left out: there the total is the right count, not a confusion."""
    with_all = [r for r in records if r.get("all_count") is not None]
    if not with_all:
        return {}
    mixed = [r for r in with_all if r["all_count"] > r["gt_count"]]
    return {"says_total": float(np.mean([r["pred_count"] == r["all_count"] for r in mixed])) if mixed else None,
            "n_with_distractors": len(mixed), "n_with_all_points": len(with_all)}


def size_error(records: list[dict]) -> dict:
    """Text-only protocol: mean |estimated / exemplar object size - 1| over the images with both; {} otherwise."""
    pairs = [(r["object_size"], r["gt_object_size"]) for r in records
             if r.get("object_size") is not None and r.get("gt_object_size")]
    if not pairs:
        return {}
    return {"object_size_rel_err": float(np.mean([abs(est / gt - 1) for est, gt in pairs]))}


@functools.lru_cache(maxsize=8)
def train_mean_count(data_root: str, train_split: str = "train") -> float | None:
    """The training split's mean count, or None without a usable split. Read once per (root, split):
    training asks at every evaluation, and the split does not change during a run."""
    try:
        train = FSC147Dataset(data_root, train_split)
    except UsageError:
        return None
    return float(np.mean([len(e["points"]) for e in train.entries]))


def mean_count_baseline(data_root: str, records: list[dict], train_split: str = "train") -> dict:
    """MAE / RMSE of always predicting the training split's mean count (the trivial baseline)."""
    mean = train_mean_count(data_root, train_split)
    if mean is None:
        return {}
    gt = np.array([r["gt_count"] for r in records], dtype=np.float64)
    return {"train_mean_count": mean, "baseline_mean_mae": float(np.abs(gt - mean).mean()),
            "baseline_mean_rmse": float(math.sqrt(((gt - mean) ** 2).mean()))}


def image_record(sample, result: CountResult, radius: float) -> dict:
    """Per-image entry of results.json."""
    width, height = sample.image.size
    return {
        "id": sample.id, "class_name": sample.class_name, "gt_count": int(len(sample.points)),
        "pred_count": result.count,
        "all_count": None if sample.all_points is None else int(len(sample.all_points)),
        "points": [[round(float(x), 2), round(float(y), 2)] for x, y in result.points],
        "steps": result.steps, "forwards_per_image": result.steps, "tiles": result.tiles,
        "n_seam_duplicates": result.n_seam_duplicates, "capped": result.capped, "n_outside": result.n_outside,
        "n_duplicate": result.n_duplicate, "stopped_on_duplicates": result.stopped_on_duplicates,
        "match_radius": round(radius, 2),
        "n_matched": match_points(result.points, sample.points, radius),
        "n_on_other_class": None if sample.all_points is None
        else other_class_points(result.points, sample.points, sample.all_points, radius),
        "mark_radius": result.mark_radius,
        "object_size": None if result.object_size is None else round(result.object_size, 2),
        "gt_object_size": round(object_size(sample.boxes, width, height), 2) if len(sample.boxes) else None,
        "done_probs": [round(p, 4) for p in result.done_probs],  # sigmoid(done) at each forward: why it stopped
    }


def overlay(sample, result: CountResult) -> Image.Image:
    """Side by side: the model's numbered marks (as it drew them) | ground-truth points as dots."""
    width, height = sample.image.size
    left = draw_marks(sample.image, result.points, radius=result.mark_radius)
    right = sample.image.copy()
    draw = ImageDraw.Draw(right)
    r = max(2, mark_radius(width, height) // 2)
    for x, y in sample.points:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(0, 255, 0), outline=(0, 0, 0))
    canvas = Image.new("RGB", (2 * width + 8, height), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (width + 8, 0))
    ImageDraw.Draw(canvas).text((4, 4), f"pred {result.count}", fill=(255, 255, 0), stroke_width=2, stroke_fill=(0, 0, 0))
    ImageDraw.Draw(canvas).text((width + 12, 4), f"gt {len(sample.points)}", fill=(0, 255, 0), stroke_width=2,
                                stroke_fill=(0, 0, 0))
    return canvas


def count_dataset(model, dataset, settings: CountSettings, max_images: int = 0, match_radius: float = 0.0,
                  progress: bool = True, indices=None):
    """Count the images of a dataset: all, `max_images` of them spread over the classes, or `indices`, with
    the counting loop's `settings` (protocol text: marks sized by the model; exemplar: by each image's
    exemplar boxes).

    Returns (records, summary, samples, results); the summary is empty when there is nothing to count
    (a process's empty slice). summary["complete"] says whether every image asked for was counted
    (the whole split unless max_images or indices): a published MAE must be over all of them.
    """
    from tqdm.auto import tqdm

    asked = dataset.subset_indices(max_images) if indices is None else list(indices)
    samples, skipped = [], 0
    for i in asked:
        sample = dataset[i]
        if sample is None:
            skipped += 1  # unreadable image: dataset logged it; counted here
        else:
            samples.append(sample)
    if not samples:
        if indices is not None and not skipped:
            return [], {}, [], []
        raise UsageError(f"no readable images to count ({skipped} skipped)")
    bar = tqdm(total=len(samples), desc="counting", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    radii = [mark_radius(*s.image.size, s.boxes) for s in samples] if settings.protocol == "exemplar" else None
    results = count_images(model, [s.image for s in samples], [s.class_name for s in samples], settings,
                           mark_radii=radii, progress=bar)
    elapsed = time.perf_counter() - start
    bar.close()
    records = [image_record(s, r, match_radius or default_radius(s.boxes, *s.image.size))
               for s, r in zip(samples, results)]
    # A published MAE is over every image the split lists: a --max_images sample is never complete, however
    # well it went; training's slices (`indices`) are complete when every asked image was counted.
    subset = indices is None and len(asked) < len(dataset)
    listed = len(asked) if indices is not None else dataset.num_listed
    unusable = dataset.num_skipped if indices is None and not subset else 0  # rejected when the split was read
    summary = {"protocol": settings.protocol, "points_per_step": settings.points_per_step or "auto",
               "tiles": settings.tiles or "auto", "mean_tiles": float(np.mean([r["tiles"] for r in records])),
               **summarize(records, elapsed), "n_skipped": skipped + unusable, "n_asked": len(asked),
               "n_listed": listed, "subset": subset, "complete": len(records) == listed and not subset}
    return records, summary, samples, results


def incomplete_warning(summary: dict, split: str) -> str:
    """The line printed when some listed images were not counted, or "" when all were."""
    if summary.get("complete", True):
        return ""
    why = (f"a sample of {summary['n_asked']} (--max_images)" if summary.get("subset") else
           f"{summary['n_listed'] - summary['n_images']} unreadable or unusable, see the log")
    if summary.get("subset") and summary["n_images"] < summary["n_asked"]:
        why += f", {summary['n_asked'] - summary['n_images']} of them unreadable"
    return (f"WARNING: counted {summary['n_images']} of the {summary['n_listed']} images listed in split {split!r} "
            f"({why}): these metrics are not over the whole split and do not compare with published results on it")


def print_summary(summary: dict, split: str) -> None:
    rows = [("protocol", summary["protocol"]), ("done threshold", f"{summary.get('done_threshold', '-')}"
                                                + (f" (chosen on {summary['threshold_tuning']['split']})"
                                                   if "threshold_tuning" in summary else "")),
            ("images", f"{summary['n_images']}"), ("MAE", f"{summary['mae']:.3f}"),
            ("RMSE", f"{summary['rmse']:.3f}"),
            ("NAE", f"{summary['nae']:.3f}"), ("precision", f"{summary['precision']:.3f}"),
            ("recall", f"{summary['recall']:.3f}"), ("F1", f"{summary['f1']:.3f}"),
            ("capped", f"{summary['n_capped']}"), ("stopped on duplicates", f"{summary['n_stopped_on_duplicates']}"),
            ("within 1", f"{summary['within_1']:.3f}"), ("forwards per image", f"{summary['forwards_per_image']:.2f}"),
            ("tiles", f"{summary['tiles']} (mean grid {summary['mean_tiles']:.2f})"),
            ("skipped", f"{summary['n_skipped']}"), ("counted / listed", f"{summary['n_images']} / {summary['n_listed']}"),
            ("images/s", f"{summary['images_per_s']:.2f}")]
    if summary.get("says_total") is not None:
        rows.append(("says_total", f"{summary['says_total']:.3f} ({summary['n_with_distractors']} images)"))
    if summary.get("points_on_other_class") is not None:
        rows.append(("points on another class", f"{summary['points_on_other_class']:.3f} "
                                                f"({summary['n_points_on_other_class']} points)"))
    if "object_size_rel_err" in summary:
        rows.append(("object size rel. error", f"{summary['object_size_rel_err']:.3f}"))
    if "baseline_mean_mae" in summary:
        rows += [("mean-count baseline MAE", f"{summary['baseline_mean_mae']:.3f}"),
                 ("mean-count baseline RMSE", f"{summary['baseline_mean_rmse']:.3f}")]
    print(f"\n{split} split")
    for name, value in rows:
        print(f"  {name:25s} {value:>10s}")
    if 1 < len(summary.get("per_class", {})) <= 20:  # FSC-147's test split has 29 classes: too many to print
        print("  per class (images, exact, MAE, mean pred - gt):")
        for name, c in summary["per_class"].items():
            print(f"    {name:23s} {c['n_images']:4d} {c['exact_acc']:6.3f} {c['mae']:6.3f} {c['bias']:+6.2f}")
    if incomplete_warning(summary, split):
        print("  " + incomplete_warning(summary, split))


def choose_threshold(cfg: EvalConfig, model, settings: CountSettings) -> tuple[float, dict]:
    """The done threshold with the lowest MAE on --tune_split, counted as --split will be (points per forward and
    tiles as given: a threshold suits the mode it was chosen in, and several points per forward make the choice
    ~10x cheaper), and what each threshold scored there. Reads no image of --split."""
    tune = FSC147Dataset(cfg.data_root, cfg.tune_split)
    maes = {}
    for t in parse_thresholds(cfg.tune_threshold):
        print(f"choosing the done threshold on {cfg.tune_split!r}: {t}", flush=True)
        _, summary, _, _ = count_dataset(model, tune, dataclasses.replace(settings, done_threshold=t),
                                         cfg.tune_images, cfg.match_radius)
        maes[t] = summary["mae"]
    chosen = pick_threshold(maes, cfg.done_threshold)
    return chosen, {"split": cfg.tune_split, "images": summary["n_images"], "mae_per_threshold": {str(t): m for t, m in
                    maes.items()}, "chosen": chosen}


def main(argv=None) -> int:
    cfg = parse_config(EvalConfig, argv, __doc__, validate_eval_config)
    try:
        dataset = FSC147Dataset(cfg.data_root, cfg.split)
        model, trained = load_checkpoint(cfg.checkpoint, device=cfg.device, **base_override(cfg.model_name_or_path))
        settings = CountSettings(cfg.batch_size, cfg.done_threshold, cfg.max_count, cfg.protocol,
                                 points_per_step_for(cfg.points_per_step, cfg.checkpoint), cfg.duplicate_guard,
                                 tiles_for(cfg.tiles, trained.pointing), object_tokens=trained.object_tokens)
        tuning = {}
        if cfg.tune_threshold:  # chosen on another split before a single image of this one is read
            threshold, tuning = choose_threshold(cfg, model, settings)
            settings = dataclasses.replace(settings, done_threshold=threshold)
        records, summary, samples, results = count_dataset(model, dataset, settings, cfg.max_images, cfg.match_radius)
        summary["done_threshold"] = settings.done_threshold
        if settings.tiles == 0:  # what auto's grids were chosen against (0: the checkpoint recorded none)
            summary["object_tokens"] = settings.object_tokens
        if tuning:
            summary["threshold_tuning"] = tuning
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = cfg.output_dir or os.path.join(cfg.checkpoint, f"eval-{cfg.split}")
    os.makedirs(out, exist_ok=True)
    summary.update(mean_count_baseline(cfg.data_root, records))
    summary.update({"split": cfg.split, "checkpoint": cfg.checkpoint, "config": asdict(cfg)})
    write_json_atomic(os.path.join(out, "results.json"), {"summary": summary, "images": records})
    for sample, result in list(zip(samples, results))[:cfg.save_overlays]:
        overlay(sample, result).save(os.path.join(out, f"overlay_{os.path.splitext(sample.id)[0]}.png"))
    print_summary(summary, cfg.split)
    print(f"\nresults: {os.path.join(out, 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
