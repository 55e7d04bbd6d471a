"""The training input on tf.data service workers: scale-out on TensorFlow's own engine, for a host whose
cores cannot feed its GPUs.

    medseg input-service dispatcher --port 5050                       # one, anywhere the trainer reaches
    medseg input-service worker --dispatcher HOST:5050 [--port 5051]  # one per machine with spare cores
    medseg train --params P --set training.input_service=grpc://HOST:5050

The whole training pipeline (reads, decoding, sampling, augmentation, batching: TensorFlow ops only, so
its graph travels to the workers) runs on the workers in "distributed_epoch" mode: the dispatcher hands
out the training files, each to one worker at a time, so the workers share the epochs instead of each
making all of them. Workers need TensorFlow of the trainer's version and read the records at the same
paths (a shared file system).
"""
import signal
import threading

import tensorflow as tf


def served(batches: tf.data.Dataset, address: str) -> tf.data.Dataset:
    """`batches` made by the tf.data service at `address` (grpc://HOST:PORT) instead of in this process."""
    return batches.apply(tf.data.experimental.service.distribute("distributed_epoch", service=address))


def run_dispatcher(port: int, work_dir: str = None) -> None:
    """Serve as the dispatcher on `port` until SIGINT/SIGTERM. work_dir: where it keeps its journal, so that
    a restarted dispatcher resumes its jobs (none: in memory)."""
    config = tf.data.experimental.service.DispatcherConfig(port=port, work_dir=work_dir,
                                                           fault_tolerant_mode=work_dir is not None)
    server = tf.data.experimental.service.DispatchServer(config)
    print(f"tf.data service dispatcher on {server.target}; train with "
          f"--set training.input_service=grpc://<this host>:{port}", flush=True)
    _serve_until_stopped(server)


def run_worker(dispatcher: str, port: int = 0) -> None:
    """Serve as a worker of the dispatcher at `dispatcher` (HOST:PORT) until SIGINT/SIGTERM; port 0: any free."""
    config = tf.data.experimental.service.WorkerConfig(dispatcher_address=dispatcher, port=port)
    server = tf.data.experimental.service.WorkerServer(config)
    print(f"tf.data service worker of {dispatcher}", flush=True)
    _serve_until_stopped(server)


def _serve_until_stopped(server):
    """Keep `server` (a dispatcher or worker) serving until SIGINT or SIGTERM, then stop it."""
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    server.stop()
