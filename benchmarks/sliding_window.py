"""W2 and W2 overhead of BENCHMARKS.md: sliding-window inference of one BraTS volume.

    python benchmarks/sliding_window.py [--workload W2|W2-overhead] [--quick] [--peers] [--repetitions 3]

One volume (FLAIR and T1c, 240x240x155x2 float32), window 96^3, overlap 0.5, batch of 4 windows,
Gaussian and constant blending. W2: through one 1x1x1 convolution 2 -> 5 channels (Keras Conv3D;
torch Conv3d for the peers). W2-overhead: through a network that costs nothing (the 2 channels
repeated to 5, `concat([x, x, x[..., :1]])`), so the figure is the windowing itself: extraction,
weighting, accumulation and normalisation. That concat is not free either, and not equally so: on the
channels-last (N, X, Y, Z, C) windows TensorFlow interleaves 2 + 2 + 1 values per voxel, torch on
channels-first windows copies three blocks. So every line also has `network_s`, the same network
alone over the same number of windows (one batch, called as often as the volume has batches), and
`windowing_s` = value - network_s, the windowing without the network; medseg_dl lines compare both
(speedup_vs_<peer>, windowing_speedup_vs_<peer>). Every library returns the same thing, the blended
logits (medseg_dl: `Predictor.logits`); `probabilities_s` on the medseg_dl lines adds the softmax
(`Predictor.probabilities`). Each (workload, library, blending) runs in a fresh subprocess with the
library's own interpreter (`harness.python_for`; `isolated` on its line), so its peak RSS
(imports, the read volume and the inference; `harness.RSS_METHOD`) is its own. The figure is the median
s/volume of the repetitions after one warm-up (network_s and probabilities_s too); every repetition is
kept beside its median (`value_runs`, `network_s_runs`, `probabilities_s_runs`). `--peers` adds MONAI
sliding_window_inference (gaussian/constant) and TorchIO GridSampler + GridAggregator (hann/average),
with speedup_vs_<peer> (peer s / our s) and peak_rss_ratio_vs_<peer> on the medseg_dl lines. Lines are
kept in benchmarks/results/sliding_window.jsonl (not with --quick: a 64x64x48 crop, window 32, one
repetition).
"""
import argparse
import json
import os

import numpy as np
from datasets import BRATS_SUBJECT, read_brats_image
from harness import add_ratios, peers_available, run_python, speedup, spread, timed_runs
from machine_info import record

NUM_CLASSES, BATCH_SIZE, OVERLAP = 5, 4, 0.5
WORKLOADS = ("W2", "W2-overhead")
CONFIGS = {"medseg_dl": ("gaussian", "constant"), "monai": ("gaussian", "constant"), "torchio": ("hann", "average")}
MATCHING_BLENDING = {"gaussian": {"monai": "gaussian", "torchio": "hann"},
                     "constant": {"monai": "constant", "torchio": "average"}}


def load_volume(subject_dir, quick):
    """The workload volume (X, Y, Z, 2) float32 and the window size; quick: a 64x64x48 crop, window 32."""
    image = read_brats_image(subject_dir)
    if quick:
        return np.ascontiguousarray(image[88:152, 88:152, 54:102]), 32
    return image, 96


def run_medseg_dl(image, window, blending, repetitions, workload):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf
    from medseg_dl.data.targets import Targets
    from medseg_dl.inference.predictor import Predictor
    from medseg_dl.inference.windows import window_grid

    if workload == "W2":
        conv = keras.layers.Conv3D(NUM_CLASSES, 1)
        conv.build((None, window, window, window, image.shape[-1]))
        network = tf.function(conv)
    else:
        network = tf.function(lambda x: tf.concat([x, x, x[..., :1]], axis=-1))
    targets = Targets(NUM_CLASSES, tuple(f"class_{k}" for k in range(NUM_CLASSES)))
    predictor = Predictor(lambda inputs: network(inputs["image"]), (window,) * 3, targets, overlap=OVERLAP,
                          blending=blending, batch_size=BATCH_SIZE)
    times = timed_runs(lambda _: predictor.logits(image), repetitions)[1]
    details = {"probabilities_s": timed_runs(lambda _: predictor.probabilities(image), repetitions)[1]}
    num_windows = window_grid(image.shape[:3], (window,) * 3, OVERLAP, blending).num_windows
    batch = tf.random.uniform((BATCH_SIZE, window, window, window, image.shape[-1]))

    def network_alone(_):
        run_batches(lambda: network(batch).numpy(), num_windows)

    details["network_s"] = timed_runs(network_alone, repetitions)[1]
    return times, details, num_windows


def run_batches(network_call, num_windows):
    """Call the network once per batch of `num_windows` windows, dropping each output."""
    for _ in range(0, num_windows, BATCH_SIZE):
        network_call()


def torch_network(image, window, workload):
    import torch
    torch.set_grad_enabled(False)
    if workload == "W2":
        network = torch.nn.Conv3d(image.shape[-1], NUM_CLASSES, 1).eval()
    else:
        def network(x):
            return torch.cat([x, x, x[:, :1]], dim=1)
    volume = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0)))
    return torch, network, volume


def torch_details(torch, network, num_windows, window, channels, repetitions):
    batch = torch.rand(BATCH_SIZE, channels, window, window, window)
    return {"network_s": timed_runs(lambda _: run_batches(lambda: network(batch), num_windows), repetitions)[1]}


def run_monai(image, window, blending, repetitions, workload):
    from monai.inferers import sliding_window_inference
    torch, conv, volume = torch_network(image, window, workload)
    counter = {"windows": 0}

    def network(batch):
        counter["windows"] += batch.shape[0]
        return conv(batch)

    times = timed_runs(lambda _: sliding_window_inference(volume[None], (window,) * 3, BATCH_SIZE, network,
                                                          overlap=OVERLAP, mode=blending), repetitions)[1]
    num_windows = counter["windows"] // (repetitions + 1)
    return times, torch_details(torch, conv, num_windows, window, image.shape[-1], repetitions), num_windows


def run_torchio(image, window, blending, repetitions, workload):
    import torchio as tio
    torch, conv, volume = torch_network(image, window, workload)
    subject = tio.Subject(image=tio.ScalarImage(tensor=volume))

    def predict():
        sampler = tio.inference.GridSampler(subject, window, patch_overlap=int(window * OVERLAP))
        aggregator = tio.inference.GridAggregator(sampler, overlap_mode=blending)
        for batch in torch.utils.data.DataLoader(sampler, batch_size=BATCH_SIZE):
            aggregator.add_batch(conv(batch["image"][tio.DATA]), batch[tio.LOCATION])
        return aggregator.get_output_tensor()

    times = timed_runs(lambda _: predict(), repetitions)[1]
    num_windows = len(tio.inference.GridSampler(subject, window, patch_overlap=int(window * OVERLAP)))
    return times, torch_details(torch, conv, num_windows, window, image.shape[-1], repetitions), num_windows


RUNNERS = {"medseg_dl": run_medseg_dl, "monai": run_monai, "torchio": run_torchio}


def child(workload, library, blending, args):
    """Run one configuration and print its raw measurements as one JSON object."""
    image, window = load_volume(args.subject_dir, args.quick)
    times, details, num_windows = RUNNERS[library](image, window, blending, args.repetitions, workload)
    print(json.dumps({"times": times, **details, "windows": num_windows, "voxels": int(np.prod(image.shape[:3])),
                      "window": window}))


def measure(workload, library, blending, args):
    """Raw measurements of one configuration, from a fresh subprocess with its peak RSS."""
    measured, isolated = run_python(library, [os.path.abspath(__file__), "--child", workload, library, blending,
                                              "--repetitions", args.repetitions, "--subject-dir", args.subject_dir,
                                              *["--quick"] * args.quick])
    return {**measured.result, "peak_rss_mb": measured.peak_rss_mb, "isolated": isolated}


def line(workload, library, blending, raw):
    """The BENCHMARKS.md JSON line of one configuration."""
    value = float(np.median(raw["times"]))
    item = {"workload": workload, "library": library, **spread(raw["times"], 4), "unit": "s", "blending": blending,
            "voxels_per_s": round(raw["voxels"] / value),
            "peak_rss_mb": round(raw["peak_rss_mb"], 1), "windows": raw["windows"], "window": raw["window"],
            "isolated": raw["isolated"]}
    for key in ("network_s", "probabilities_s"):
        if key in raw:
            item.update({key: round(float(np.median(raw[key])), 4), f"{key}_runs": [round(t, 4) for t in raw[key]]})
    if "network_s" in raw:
        item["windowing_s"] = round(value - float(np.median(raw["network_s"])), 4)
    return item


def add_peer_ratios(lines):
    """Add speedup_vs_<peer> (peer s / our s) and peak_rss_ratio_vs_<peer> to the medseg_dl lines."""
    by_key = {(item["workload"], item["library"], item["blending"]): item for item in lines}
    for item in lines:
        if item["library"] != "medseg_dl":
            continue
        for peer, peer_blending in MATCHING_BLENDING[item["blending"]].items():
            other = by_key.get((item["workload"], peer, peer_blending))
            if other is not None:
                add_ratios(item, other, peer)
                if "windowing_s" in item and "windowing_s" in other:
                    item[f"windowing_speedup_vs_{peer}"] = speedup(item, other, "windowing_s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=WORKLOADS, action="append", help="default: both")
    parser.add_argument("--quick", action="store_true", help="small crop, one repetition (smoke run)")
    parser.add_argument("--peers", action="store_true", help="also run MONAI and TorchIO when importable")
    parser.add_argument("--repetitions", type=int, default=None, help="timed runs after the warm-up (default 3)")
    parser.add_argument("--subject-dir", default=BRATS_SUBJECT, help="folder of the BraTS subject")
    parser.add_argument("--child", nargs=3, metavar=("WORKLOAD", "LIBRARY", "BLENDING"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repetitions is None:
        args.repetitions = 1 if args.quick else 3
    if args.child:
        child(*args.child, args)
        return
    libraries = ["medseg_dl"] + (peers_available({peer: f"torch, {peer}" for peer in ("monai", "torchio")})
                                 if args.peers else [])
    lines = [line(workload, library, blending, measure(workload, library, blending, args))
             for workload in args.workload or WORKLOADS for library in libraries for blending in CONFIGS[library]]
    add_peer_ratios(lines)
    for item in lines:
        record("sliding_window", item, keep=not args.quick)

if __name__ == "__main__":
    main()
