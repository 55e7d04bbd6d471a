"""`medseg` command line: convert, train, evaluate, predict, show, params-doc.

Every subcommand takes `--set section.key=value` overrides. A user mistake (`MedsegError`) is
printed as one line naming the file and the fix, with exit code 2 and no traceback.
"""
import argparse
import os
import sys

from medseg_dl.errors import MedsegError


def _add_params_arguments(parser, required=True):
    parser.add_argument("--params", required=required, metavar="YAML",
                        help="experiment params file, or <model_dir>/params.yaml to resume")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one parameter (repeatable), e.g. --set training.steps=200")


def _cmd_convert(args):
    from medseg_dl.data.convert import convert_dataset
    from medseg_dl.model_dir import open_model_dir

    params, model_dir, _ = open_model_dir(args.params, args.set, args.overwrite)
    index = convert_dataset(params, overwrite=args.overwrite)
    folder = params.data.tfrecords_dir
    size_mb = sum(os.path.getsize(os.path.join(folder, e["file"])) for e in index["subjects"].values()) / 2**20
    print(f"converted {len(index['subjects'])} subjects into {folder} ({size_mb:.1f} MB); "
          f"model folder {model_dir.root}")


def _cmd_params_doc(args):
    from medseg_dl.params_doc import params_reference

    print(params_reference())


def _not_implemented(args):
    raise MedsegError(f"'medseg {args.command}' is not implemented yet in this version")


def build_parser():
    parser = argparse.ArgumentParser(prog="medseg", description="Patch-based 3D medical image segmentation.")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert a dataset folder to TFRecords")
    _add_params_arguments(convert)
    convert.add_argument("--overwrite", action="store_true", help="empty the model folder and convert again")
    convert.set_defaults(handler=_cmd_convert)

    train = commands.add_parser("train", help="train (resume with <model_dir>/params.yaml)")
    _add_params_arguments(train)
    train.add_argument("--overwrite", action="store_true", help="empty a model folder of another experiment")
    train.set_defaults(handler=_not_implemented)

    evaluate = commands.add_parser("evaluate", help="watch checkpoints and evaluate them")
    _add_params_arguments(evaluate)
    evaluate.set_defaults(handler=_not_implemented)

    predict = commands.add_parser("predict", help="segment new images with a trained model")
    predict.add_argument("--model-dir", required=True)
    predict.add_argument("--input", required=True, nargs="+")
    predict.add_argument("--output", required=True)
    predict.add_argument("--set", action="append", default=[])
    predict.set_defaults(handler=_not_implemented)

    show = commands.add_parser("show", help="view volumes, labels, predictions, batches, curves")
    _add_params_arguments(show, required=False)
    show.set_defaults(handler=_not_implemented)

    doc = commands.add_parser("params-doc", help="print the params reference (Markdown)")
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
