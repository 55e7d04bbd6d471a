"""W5 of ../shared/BENCHMARKS.md: training-step throughput of the same 3D U-Net in medseg_dl and MONAI.

    python benchmarks/training_step.py [--workload W5] [--quick] [--skip-jit] [--profile]

The nnU-Net-like U-Net (4 levels of 16/32/64/128 filters, 3x3x3 convolutions, strided down,
transposed up, instance norm, leaky ReLU 0.01, no deep supervision), Dice + cross-entropy, Adam 1e-3
(constant, no clipping), one fixed synthetic batch of 9 patches 1x40x56x40 with 3 classes: forward,
backward and update. Ours is the training loop's own step (`loop.make_train_step`, which also updates
the streaming Dice) in float32, mixed_bfloat16 and float32 with jit_compile (`--skip-jit` leaves it
out); the peer is MONAI DynUNet(filters=[16, 32, 64, 128], strides=[1, 2, 2, 2], norm_name="instance")
with DiceCELoss (softmax, background excluded, batch Dice: our loss's definition) and torch Adam,
in float32 and under torch.autocast(bfloat16), with torch's default threads. Each configuration runs
in a fresh subprocess with the library's own interpreter (`harness.python_for`; `isolated` on
its line): the keras dtype policy is global, and its peak RSS (`harness.RSS_METHOD`) is its own. The figure is the
median patches/s of 6 timed steps after 2 warm-up steps (every step's rate and time kept: `value_runs`,
`step_time_s_runs`); a configuration whose second warm-up step takes over 10 s times 2 steps (said by
`note`). medseg_dl lines carry `speedup_vs_monai` (ours /
MONAI float32) and, when not float32, `speedup_vs_monai_same_precision`. Kept in
results/training_step.jsonl.

`--profile` instead splits our step, float32 and mixed_bfloat16 (a subprocess each), into parts, each
its own tf.function, median of 5 calls after 2 warm-up calls (every call's seconds kept in
`call_s_runs`, per function: forward, loss, gradients, optimizer, metric, step, step_norm_none): forward
(training mode); forward + loss; forward + loss + gradients; the optimizer update alone (fixed
gradients); the metric update alone; the full step; the full step of the same network without
normalisation (`instance_norm_share` = the difference / the full step); and `top_op_types`, each op
type's share of the op self-time in a TF profiler trace of two full steps. Kept in
results/training_profile.jsonl. `--quick`: batch 2 of 16x16x16, base 4 filters, 1 timed step or call (a
smoke run, never kept).
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
from harness import ChildFailed, run_python, speedup, spread, timed_runs
from machine_info import record

NUM_CLASSES, LEVELS = 3, 4
WARMUP_STEPS, TIMED_STEPS, SLOW_STEP_S, SLOW_TIMED_STEPS, PROFILE_CALLS, TOP_OPS = 2, 6, 10.0, 2, 5, 8
CONFIGS = [("medseg_dl", "float32", False), ("medseg_dl", "mixed_bfloat16", False), ("medseg_dl", "float32", True),
           ("monai", "float32", False), ("monai", "mixed_bfloat16", False)]


def sizes(quick):
    """Batch size, patch size (X, Y, Z) and base filters of the workload (quick: a tiny one)."""
    return (2, (16, 16, 16), 4) if quick else (9, (40, 56, 40), 16)


def synthetic_batch(quick):
    """The fixed batch as numpy: image (N, X, Y, Z, 1) float32, label (N, X, Y, Z) int32, position (N, 3)."""
    batch_size, patch, _ = sizes(quick)
    rng = np.random.default_rng(0)
    return {"image": rng.standard_normal((batch_size, *patch, 1), np.float32),
            "label": rng.integers(0, NUM_CLASSES, (batch_size, *patch), dtype=np.int32),
            "position": rng.uniform(size=(batch_size, 3)).astype(np.float32)}


def timed_steps(step, quick):
    """(seconds of the timed steps, seconds of the warm-up steps): TIMED_STEPS, or SLOW_TIMED_STEPS when
    the last warm-up step took over SLOW_STEP_S (quick: 1)."""
    warmup_s, _ = timed_runs(lambda _: step(), 0, warmups=WARMUP_STEPS)
    count = 1 if quick else SLOW_TIMED_STEPS if warmup_s[-1] > SLOW_STEP_S else TIMED_STEPS
    return timed_runs(lambda _: step(), count, warmups=0)[1], warmup_s


def medseg_spec(precision, quick, jit_compile=False, norm="instance"):
    """(params, built ModelSpec) of the workload's U-Net; sets the global keras dtype policy."""
    from medseg_dl.config.params import Params
    from medseg_dl.runtime.devices import configure_devices
    from medseg_dl.model.model_fn import model_fn
    batch_size, patch, base_filters = sizes(quick)
    params = Params.from_dict({
        "data": {"num_classes": NUM_CLASSES}, "sampling": {"patch_size": list(patch), "batch_size": batch_size},
        "model": {"architecture": "unet", "base_filters": base_filters, "depth": LEVELS, "norm": norm,
                  "activation": "leaky_relu", "deep_supervision": False},
        "loss": {"name": "dice_ce"},
        "training": {"optimizer": "adam", "learning_rate": 1e-3, "schedule": "constant", "clip_norm": None,
                     "precision": precision, "jit_compile": jit_compile}})
    configure_devices(params.training, "training")
    spec = model_fn(params)
    spec.build(params.sampling.patch_size)
    return params, spec


def tensor_batch(quick):
    import tensorflow as tf
    return {key: tf.constant(value) for key, value in synthetic_batch(quick).items()}


def run_medseg_dl(precision, jit_compile, quick):
    """Our real training step on the synthetic batch: (timed_steps, the dtype policy in force)."""
    import tensorflow as tf
    from medseg_dl.training.loop import make_train_step
    params, spec = medseg_spec(precision, quick, jit_compile)
    step = make_train_step(tf.distribute.get_strategy(), spec, params.training.jit_compile)
    batch, stop = tensor_batch(quick), tf.constant(0.0)
    return timed_steps(lambda: float(step(batch, stop)[0].numpy()), quick), spec.precision


def run_monai(precision, quick):
    """MONAI DynUNet + DiceCELoss + torch Adam on the synthetic batch: (timed_steps, precision);
    mixed_bfloat16 runs the forward pass under torch.autocast(bfloat16) and the loss in float32."""
    import torch
    from monai.losses import DiceCELoss
    from monai.networks.nets import DynUNet
    _, _, base_filters = sizes(quick)
    network = DynUNet(3, 1, NUM_CLASSES, kernel_size=[3] * LEVELS, strides=[1] + [2] * (LEVELS - 1),
                      upsample_kernel_size=[2] * (LEVELS - 1),
                      filters=[base_filters * 2 ** level for level in range(LEVELS)], norm_name="instance").train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    arrays = synthetic_batch(quick)
    image = torch.from_numpy(np.ascontiguousarray(np.moveaxis(arrays["image"], -1, 1)))
    label = torch.from_numpy(arrays["label"][:, None].astype(np.int64))

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "mixed_bfloat16"):
            logits = network(image)
        loss = loss_fn(logits.float(), label)
        loss.backward()
        optimizer.step()
        return loss.item()

    return timed_steps(step, quick), precision


def call_seconds(function, quick):
    """Seconds of each of PROFILE_CALLS calls (quick: 1) of `function` (a tf.function, outputs waited for)
    after WARMUP_STEPS warm-up calls."""
    import tensorflow as tf

    def call(_):
        for output in tf.nest.flatten(function()):
            if output is not None:
                output.numpy()

    return timed_runs(call, 1 if quick else PROFILE_CALLS, warmups=WARMUP_STEPS)[1]


def top_op_types(step):
    """{op type: share of the op self-time} of the TOP_OPS largest in a TF profiler trace of two calls
    of `step` (TensorFlow's own trace converter, a private module: None where it is missing)."""
    import tensorflow as tf
    try:
        from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as profiler_plugin
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as log_dir:
        tf.profiler.experimental.start(log_dir)
        for _ in range(2):
            step()
        tf.profiler.experimental.stop()
        traces = [os.path.join(root, name) for root, _, names in os.walk(log_dir)
                  for name in names if name.endswith(".xplane.pb")]
        table = json.loads(profiler_plugin.xspace_to_tools_data(traces, "framework_op_stats", {})[0])[0]
    columns = [column["id"] for column in table["cols"]]
    self_us = {}
    for row in table["rows"]:
        op = dict(zip(columns, (cell.get("v") for cell in row["c"])))
        if op["type"] != "IDLE":
            self_us[op["type"]] = self_us.get(op["type"], 0.0) + op["total_self_time"]
    total_us = sum(self_us.values())
    ranked = sorted(self_us.items(), key=lambda item: -item[1])[:TOP_OPS]
    return {op_type: round(us / total_us, 3) for op_type, us in ranked}


def profile_medseg_dl(precision, quick):
    """The parts of our step (see the module docstring) in seconds (medians), every call's seconds per
    measured function (`call_s_runs`), and the trace's top op types."""
    import tensorflow as tf
    from medseg_dl.training.loop import make_train_step
    _, spec = medseg_spec(precision, quick)
    batch, stop = tensor_batch(quick), tf.constant(0.0)
    network, labels, variables = spec.network, batch["label"], spec.network.trainable_variables

    def forward():
        return network(batch, training=True)

    def loss():
        return spec.loss_fn(labels, forward())

    def gradients():
        with tf.GradientTape() as tape:
            scaled = spec.optimizer.scale_loss(loss())
        return tape.gradient(scaled, variables)

    fixed_gradients, logits = tf.function(gradients)(), tf.function(forward)()
    strategy = tf.distribute.get_strategy()
    step = make_train_step(strategy, spec)
    parts = {"forward": forward, "loss": loss, "gradients": gradients,
             "optimizer": lambda: spec.optimizer.apply(fixed_gradients, variables),
             "metric": lambda: spec.metrics["dice"].update_state(labels, logits)}
    runs_s = {name: call_seconds(tf.function(part), quick) for name, part in parts.items()}
    runs_s["step"] = call_seconds(lambda: step(batch, stop), quick)
    top_ops = top_op_types(lambda: step(batch, stop)[0].numpy())
    _, plain_spec = medseg_spec(precision, quick, norm="none")
    plain_step = make_train_step(strategy, plain_spec)
    runs_s["step_norm_none"] = call_seconds(lambda: plain_step(batch, stop), quick)
    cumulative_s = {name: float(np.median(seconds_of_calls)) for name, seconds_of_calls in runs_s.items()}
    step_s, step_norm_none_s, gradients_s = (cumulative_s[name] for name in ("step", "step_norm_none", "gradients"))
    parts_s = {"forward_s": cumulative_s["forward"], "loss_s": cumulative_s["loss"] - cumulative_s["forward"],
               "backward_s": gradients_s - cumulative_s["loss"], "optimizer_s": cumulative_s["optimizer"],
               "metric_s": cumulative_s["metric"], "step_s": step_s,
               "other_s": step_s - gradients_s - cumulative_s["optimizer"] - cumulative_s["metric"],
               "step_norm_none_s": step_norm_none_s}
    return {**{key: round(value, 4) for key, value in parts_s.items()},
            "instance_norm_share": round((step_s - step_norm_none_s) / step_s, 3), "top_op_types": top_ops,
            "call_s_runs": {name: [round(s, 4) for s in seconds_of_calls] for name, seconds_of_calls in runs_s.items()},
            "precision": spec.precision}


def child(library, precision, args):
    """Measure one configuration in this process and print its raw figures as one JSON object."""
    if args.profile:
        raw = profile_medseg_dl(precision, args.quick)
    else:
        if library == "medseg_dl":
            (times_s, warmup_s), resolved = run_medseg_dl(precision, args.jit_compile, args.quick)
        else:
            (times_s, warmup_s), resolved = run_monai(precision, args.quick)
        raw = {"times_s": times_s, "warmup_s": warmup_s, "precision": resolved}
        if library == "monai":
            import torch
            raw["torch_threads"] = torch.get_num_threads()
    print(json.dumps(raw))


def measure(library, precision, jit_compile, args, timeout_s=3600):
    """The raw figures of one configuration from a fresh subprocess, with its peak RSS; None (reported on stderr)
    on failure."""
    arguments = [os.path.abspath(__file__), "--child", library, precision]
    arguments += ["--jit-compile"] * jit_compile + ["--quick"] * args.quick + ["--profile"] * args.profile
    try:
        measured, isolated = run_python(library, arguments, timeout_s=timeout_s)
    except ChildFailed as failure:
        print(f"{library} {precision}{' jit_compile' * jit_compile}: no result ({failure})", file=sys.stderr)
        return None
    return {**measured.result, "peak_rss_mb": measured.peak_rss_mb, "isolated": isolated}


def step_line(library, jit_compile, raw, quick):
    """The BENCHMARKS.md JSON line of one configuration."""
    batch_size, patch, base_filters = sizes(quick)
    times_s = raw["times_s"]
    line = {"workload": "W5", "library": library, **spread([batch_size / s for s in times_s], 3),
            "unit": "patches/s", "step_time_s": round(float(np.median(times_s)), 3),
            "step_time_s_runs": [round(s, 3) for s in times_s], "precision": raw["precision"],
            "jit_compile": jit_compile, "peak_rss_mb": round(raw["peak_rss_mb"], 1),
            "warmup_s": [round(s, 2) for s in raw["warmup_s"]], "batch_size": batch_size, "patch": list(patch),
            "base_filters": base_filters, "isolated": raw["isolated"]}
    if "torch_threads" in raw:
        line["torch_threads"] = raw["torch_threads"]
    if not quick and len(times_s) < TIMED_STEPS:
        line["note"] = f"a warm-up step took over {SLOW_STEP_S:.0f} s: {len(times_s)} timed steps, not {TIMED_STEPS}"
    return line


def add_speedups(lines):
    """speedup_vs_monai (ours / MONAI float32 patches/s) and speedup_vs_monai_same_precision on our lines."""
    monai = {line["precision"]: line for line in lines if line["library"] == "monai"}
    for line in lines:
        if line["library"] != "medseg_dl":
            continue
        if "float32" in monai:
            line["speedup_vs_monai"] = speedup(line, monai["float32"])
        if line["precision"] != "float32" and line["precision"] in monai:
            line["speedup_vs_monai_same_precision"] = speedup(line, monai[line["precision"]])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="W5", choices=["W5"])
    parser.add_argument("--quick", action="store_true", help="tiny batch and network, 1 timed step (smoke run)")
    parser.add_argument("--skip-jit", action="store_true", help="leave out ours with jit_compile (slow on a CPU)")
    parser.add_argument("--profile", action="store_true", help="where our step's time goes, instead of W5")
    parser.add_argument("--child", nargs=2, metavar=("LIBRARY", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--jit-compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args)
        return
    keep, (batch_size, patch, _) = not args.quick, sizes(args.quick)
    if args.profile:
        for precision in ("float32", "mixed_bfloat16"):
            raw = measure("medseg_dl", precision, False, args)
            if raw:
                record("training_profile", {"workload": "W5-profile", "library": "medseg_dl", **raw,
                                            "peak_rss_mb": round(raw["peak_rss_mb"], 1),
                                            "median_of": PROFILE_CALLS if keep else 1, "batch_size": batch_size,
                                            "patch": list(patch)}, keep)
        return
    lines = []
    for library, precision, jit_compile in CONFIGS:
        raw = None if jit_compile and args.skip_jit else measure(library, precision, jit_compile, args)
        if raw:
            lines.append(step_line(library, jit_compile, raw, args.quick))
    add_speedups(lines)
    for line in lines:
        record("training_step", line, keep)


if __name__ == "__main__":
    main()
