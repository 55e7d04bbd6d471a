"""`medseg` command line: convert, train, evaluate, predict, export, show, plan, input-service, params-doc.

Every subcommand takes `--set section.key=value` overrides. A user mistake (`MedsegError`) is
printed as one line naming the file and the fix, with exit code 2 and no traceback.
"""
import argparse
import json
import os
import sys

from medseg_dl.config import schema
from medseg_dl.errors import MedsegError
from medseg_dl.inference import EXPORT_FORMATS, PROBABILITY_DTYPES

DISPATCHER_PORT = 5050  # medseg input-service dispatcher's default port


def _add_params_arguments(parser, required=True):
    parser.add_argument("--params", required=required, metavar="YAML",
                        help="experiment params file, or <model_dir>/params.yaml to resume")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one parameter (repeatable), e.g. --set training.steps=200")


def _cmd_convert(args):
    from medseg_dl.data.convert import convert_dataset
    from medseg_dl.data.index import case_paths
    from medseg_dl.experiment.experiment import open_model_dir

    params, model_dir, _ = open_model_dir(args.params, args.set, args.overwrite, trainer=False)
    index = convert_dataset(params, overwrite=args.overwrite)
    folder = params.data.converted_dir
    size_mb = sum(os.path.getsize(os.path.join(case, name)) for path in case_paths(folder, list(index["subjects"]))
                  for case, _, names in os.walk(path) for name in names) / 2**20
    print(f"converted {len(index['subjects'])} subjects into {folder} ({size_mb:.1f} MB); "
          f"model folder {model_dir.root}")


def _cmd_train(args):
    from medseg_dl.experiment.experiment import open_model_dir
    from medseg_dl.training.loop import run_training

    params, model_dir, _ = open_model_dir(args.params, args.set, args.overwrite, fold=args.fold)
    final_step = run_training(params, model_dir)
    print(f"training stopped at step {final_step}; checkpoints in {model_dir.checkpoints}", flush=True)


def _cmd_evaluate(args):
    from medseg_dl.evaluation.watcher import run_evaluation
    from medseg_dl.experiment.experiment import load_experiment

    if args.cv:
        from medseg_dl.config.params import Params
        from medseg_dl.evaluation.cross_validation import run_cross_validation, run_ensemble_test

        run = run_ensemble_test if args.split == "test" else run_cross_validation
        choice = {"checkpoint": args.checkpoint} if args.checkpoint else {}  # each has its default
        summary = run(Params.load(args.params, args.set), **choice)["postprocessed"]
    else:
        params, model_dir = load_experiment(args.params, args.set, fold=args.fold)
        summary = run_evaluation(params, model_dir, once=args.once, checkpoint=args.checkpoint or "latest",
                                 data_dir=args.data, layout=args.layout, timeout_s=args.timeout, split=args.split)
    if summary is not None:
        print(json.dumps({"step": summary["step"], "mean_dice": summary["mean_dice"],
                          "dice": {k: v["dice"]["mean"] for k, v in summary["classes"].items()}}))


def _cmd_predict(args):
    from medseg_dl.inference.predict import run_prediction

    written = run_prediction(args.model_dir, args.checkpoint, args.input, args.output, args.set,
                             folds=_folds(args.folds), save_probabilities=args.save_probabilities,
                             dicom_seg=args.dicom_seg)
    print(f"wrote {len(written)} files to {args.output}")


def _cmd_export(args):
    from medseg_dl.inference.export import run_export

    path = run_export(args.model_dir, args.checkpoint, args.output, folds=_folds(args.folds), overrides=args.set,
                      export_format=args.format)
    how = ("network.onnx, finish.onnx; python segment.py, numpy and onnxruntime only" if args.format == "onnx"
           else "tf.saved_model.load")
    print(f"wrote the {args.format} export {path} ({how}; metadata.json)")


def _folds(values):
    """--folds all | K [K ...] -> "all", a list of fold numbers, or None without the option."""
    if values is None or values == ["all"]:
        return None if values is None else "all"
    if not all(v.isdigit() for v in values):
        raise MedsegError(f"--folds {' '.join(values)}: give all, or fold numbers such as --folds 0 2")
    return [int(v) for v in values]


def _add_model_arguments(parser):
    """--model-dir D [D ...], --folds, --checkpoint: the trained model or ensemble of predict and export."""
    parser.add_argument("--model-dir", required=True, nargs="+", metavar="D",
                        help="a trained model folder; several for their ensemble (mean softmax); with --folds "
                        "the experiment root that holds fold_<k>/")
    parser.add_argument("--folds", nargs="+", metavar="all|K",
                        help="the ensemble of the folds <model-dir>/fold_<k>/: all, or fold numbers")
    parser.add_argument("--checkpoint", nargs="+", default=["auto"], metavar="C",
                        help="auto (default: the best an evaluator kept, else latest), best or latest, each folder's "
                        "own; or one value (auto, best, latest, a path) "
                        "per folder")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a parameter of every folder (e.g. evaluation.tta_mirroring=true)")


def _cmd_plan(args):
    from medseg_dl.planning.command import fingerprint_path, run_plan

    path = run_plan(args.data, args.layout, args.output, args.modality, args.gpu_memory_gb, args.set)
    print(f"wrote {path} and its fingerprint {fingerprint_path(path)}")


def _cmd_show(args):
    from medseg_dl.config.params import Params
    from medseg_dl.data.targets import Targets
    from medseg_dl.experiment.model_dir import ModelDir
    from medseg_dl.viz import show

    if args.curves:
        model_dir = ModelDir(os.path.abspath(args.curves))
        params = Params.load(model_dir.params_path, args.set)
        scored = [name for name, _ in Targets.from_params(params.data).structures]  # the classes or the regions
        path = show.show_curves(model_dir, ["background", *scored], args.out or model_dir.curves_png)
    elif args.batch:
        if not args.params:
            raise MedsegError("medseg show --batch needs --params (the experiment, after `medseg convert`)")
        params = Params.load(args.params, args.set)
        path = show.show_batch(params, ModelDir(params.experiment.model_dir), args.out or "batch.png")
    elif args.image:
        path = show.show_files(args.image, args.label, args.prediction, args.out)
    else:
        raise MedsegError("medseg show: give an IMAGE file, --batch --params P, or --curves MODEL_DIR")
    if path:
        print(f"wrote {path}")


def _cmd_input_service(args):
    from medseg_dl.pipeline import service

    if args.role == "dispatcher":
        service.run_dispatcher(args.port or DISPATCHER_PORT, args.work_dir)
    elif args.dispatcher is None:
        raise MedsegError("medseg input-service worker needs --dispatcher HOST:PORT (the dispatcher's address)")
    else:
        service.run_worker(args.dispatcher, args.port or 0)


def _cmd_params_doc(args):
    if args.resume:
        from medseg_dl.experiment.resume import resume_table

        print(resume_table())
        return
    from medseg_dl.config.reference import params_reference

    print(params_reference())


def build_parser():
    parser = argparse.ArgumentParser(prog="medseg", description="Patch-based 3D medical image segmentation.")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert a dataset folder to case folders (chunked, compressed)")
    _add_params_arguments(convert)
    convert.add_argument("--overwrite", action="store_true", help="empty the model folder and convert again")
    convert.set_defaults(handler=_cmd_convert)

    train = commands.add_parser("train", help="train (resume with <model_dir>/params.yaml)")
    _add_params_arguments(train)
    train.add_argument("--overwrite", action="store_true", help="empty a model folder of another experiment")
    train.add_argument("--fold", type=int, metavar="K", help="cross-validation: train fold K (data.split.folds) in "
                       "<model_dir>/fold_K/")
    train.set_defaults(handler=_cmd_train)

    evaluate = commands.add_parser("evaluate", help="watch checkpoints and evaluate them")
    _add_params_arguments(evaluate)
    evaluate.add_argument("--once", action="store_true", help="evaluate one checkpoint (--checkpoint) and exit")
    evaluate.add_argument("--checkpoint", help="with --once, --data or --split test: latest (default), best, auto or "
                          "a checkpoint path; with --cv: latest (default: the final checkpoint, chosen without the "
                          "validation cases), best or auto (chosen on them: optimistic); with --cv --split test: auto "
                          "(default, as predict) or best or latest")
    evaluate.add_argument("--fold", type=int, metavar="K", help="cross-validation: the model folder of fold K")
    evaluate.add_argument("--cv", action="store_true", help="score every fold's validation cases with its own "
                          "model, one summary in <model_dir>/cv/, and decide the post-processing; with --split test: "
                          "the test cases scored by the ensemble of all folds (<model_dir>/cv/test-ensemble/)")
    evaluate.add_argument("--split", choices=["val", "test"], default="val",
                          help="test: score one checkpoint on the held-out test list (report eval/<step>-test/)")
    evaluate.add_argument("--data", metavar="DIR",
                          help="evaluate one checkpoint (--checkpoint) on this labelled folder instead of the val split")
    evaluate.add_argument("--layout", choices=schema.key("data.layout").choices,
                          help="layout of --data (default: data.layout)")
    evaluate.add_argument("--timeout", type=float, metavar="S",
                          help="watch mode: stop after S seconds without a new checkpoint")
    evaluate.set_defaults(handler=_cmd_evaluate)

    predict = commands.add_parser("predict", help="segment new images with a trained model or an ensemble")
    _add_model_arguments(predict)
    predict.add_argument("--input", required=True, nargs="+", help="image files, subject folders or folders")
    predict.add_argument("--output", required=True, help="folder for the label maps, <subject> + the input's suffix "
                         "(.nii.gz, .nrrd, .mha; .mha for .mhd, .nii.gz for a DICOM folder)")
    predict.add_argument("--save-probabilities", choices=PROBABILITY_DTYPES, metavar="DTYPE",
                         help="also write the probabilities (X, Y, Z, K) on the input's grid, streamed: uint8 -> "
                              "<subject>_probabilities.nii.gz (round(255 p), scl_slope 1/255), float16 -> "
                              "<subject>_probabilities.npy")
    predict.add_argument("--dicom-seg", action="store_true",
                         help="for each DICOM series input also write <subject>_seg.dcm, a DICOM SEG of its labels")
    predict.set_defaults(handler=_cmd_predict)

    export = commands.add_parser("export", help="write a SavedModel or ONNX files that segment preprocessed volumes")
    _add_model_arguments(export)
    export.add_argument("--format", choices=EXPORT_FORMATS, default="savedmodel",
                        help="savedmodel (TensorFlow), or onnx (network.onnx, finish.onnx and segment.py: numpy and "
                             "onnxruntime, no TensorFlow)")
    export.add_argument("--output", required=True, metavar="DIR", help="the export folder (replaced whole)")
    export.set_defaults(handler=_cmd_export)

    planner = commands.add_parser("plan", help="configure an experiment from a dataset folder (nnU-Net's rules)")
    planner.add_argument("--data", required=True, metavar="DIR", help="the dataset folder")
    planner.add_argument("--layout", required=True, choices=schema.key("data.layout").choices)
    planner.add_argument("--modality", nargs="+", default=[], metavar="MRI|CT", help="one per channel (default: MRI, "
                         "or CT for channels named CT in an MSD dataset.json)")
    planner.add_argument("--gpu-memory-gb", type=float, help="plan for a GPU with this much memory (default: a CPU "
                         "budget)")
    planner.add_argument("--output", required=True, metavar="YAML", help="the params file to write")
    planner.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="data keys the layout needs (data.channels=[...], data.label_pattern=...), or any "
                         "key to fix instead of planning it")
    planner.set_defaults(handler=_cmd_plan)

    show = commands.add_parser("show", help="view volumes, labels, predictions, batches, curves")
    show.add_argument("image", nargs="?", help="a volume file (NIfTI, NRRD, ...) or DICOM folder")
    show.add_argument("--label", help="reference label map drawn as solid contours")
    show.add_argument("--prediction", help="predicted label map drawn as dashed contours")
    show.add_argument("--batch", action="store_true", help="draw one augmented training batch (needs --params)")
    show.add_argument("--curves", metavar="MODEL_DIR", help="plot training loss and validation Dice")
    show.add_argument("--out", help="PNG to write (without it and with a display, a viewer opens)")
    _add_params_arguments(show, required=False)
    show.set_defaults(handler=_cmd_show)

    serving = commands.add_parser("input-service", help="serve the training input on tf.data service workers "
                                  "(training.input_service)")
    serving.add_argument("role", choices=["dispatcher", "worker"])
    serving.add_argument("--port", type=int, help=f"port to listen on (dispatcher: default {DISPATCHER_PORT}; "
                         "worker: default any free one)")
    serving.add_argument("--dispatcher", metavar="HOST:PORT", help="worker: the dispatcher's address")
    serving.add_argument("--work-dir", help="dispatcher: a folder for its journal, so that a restarted dispatcher "
                         "resumes its jobs")
    serving.set_defaults(handler=_cmd_input_service)

    doc = commands.add_parser("params-doc", help="print the params reference (Markdown)")
    doc.add_argument("--resume", action="store_true", help="print the table of what a resume may change instead")
    doc.set_defaults(handler=_cmd_params_doc)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except MedsegError as err:
        print(f"medseg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medseg {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
