"""System metrics per node during training: CPU, memory, disk, network and, where pynvml finds a GPU, GPU use,
logged into the run as system/<node>/<metric> (e.g. system/10.0.0.5/cpu_utilization_percentage), so the MLflow UI
shows why one configuration trained faster than another and which node was the bottleneck.

MLflow's SystemMetricsMonitor does the sampling and the logging, on a daemon thread of the worker that runs it (the
first worker of each node: one monitor per node, whatever the number of workers on it). What towerlab adds is the
node id, the interval from the recipe (tracking.system_metrics_every), a resumed run continuing its system-metric
steps, and a stop that waits for the thread, so none is left logging into a run the driver has ended.

An outage of the tracking store does not reach training: MLflow's monitor catches the failure of its own calls and
ends its thread (the node's system metrics stop for the rest of that launch; training metrics are buffered by
tracking/mlflow_run.py's WorkerRun). It also stops by itself once the run is no longer RUNNING.
"""

from __future__ import annotations

import socket

from towerlab.util import say


def node_id() -> str:
    """The node this process runs on, as Ray knows it (its IP: unique per node of a cluster); the hostname outside
    Ray."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001: a name is still needed
        pass
    return socket.gethostname()


class SystemMetrics:
    """Sample this node's system metrics every `every` seconds into run `run_id` of store `uri` from `start()` to
    `stop()`; `every` 0 logs nothing. Neither call raises: system metrics are an aid, not part of training."""

    def __init__(self, uri: str, run_id: str, every: float, node: str | None = None):
        self.uri, self.run_id, self.every, self.node = uri, run_id, every, node
        self.monitor = None

    def start(self) -> "SystemMetrics":
        if self.every <= 0 or not (self.uri and self.run_id):
            return self
        self.node = self.node or node_id()
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            from towerlab.tracking.uri import WORKER_LIMITS, bound_retries

            bound_retries(WORKER_LIMITS)  # a worker other than rank 0 has not bounded MLflow's retries yet
            # resume_logging: a resumed run (or a restarted worker group) continues after the steps already logged
            # instead of writing step 0 again; a fresh run starts at 0 either way. samples_before_logging=1: each
            # sample is logged (aggregating several would only delay what the UI shows).
            self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.every, samples_before_logging=1,
                                                resume_logging=True, node_id=self.node, tracking_uri=self.uri)
            self.monitor.start()
        except Exception as e:  # noqa: BLE001
            say(f"warning: no system metrics for node {self.node} ({type(e).__name__}: {str(e)[:200]})")
            self.monitor = None
        return self

    def stop(self) -> None:
        """Stop sampling and wait for the monitor's thread to end (what it has batched is sent). MLflow's monitor
        logs whole intervals: the one the stop cuts short is not logged, so a run shorter than `every` has none."""
        if self.monitor is None:
            return
        try:
            self.monitor.finish()  # sets its shutdown event, joins the thread, flushes; logs its own errors
        except Exception:  # noqa: BLE001: the run's end must not fail over its system metrics
            pass
        self.monitor = None
