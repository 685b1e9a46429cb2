"""Prometheus metrics in a registry of the app's own, so several apps in one process never clash."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from a fraction of a millisecond (tiny batches on GPU) to seconds (a full batch of long texts on CPU).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """The app's Prometheus metrics: requests, latencies, batch sizes, queue depth, dropped texts, model errors."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("spamgpt_requests", "HTTP requests", ["route", "status"], registry=r)
        self.queue_wait = Histogram(
            "spamgpt_queue_wait_seconds", "Time a text waited for its batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tokenize = Histogram(
            "spamgpt_tokenize_seconds", "Tokenizing one request's texts", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "spamgpt_inference_seconds", "One batch's forward pass and softmax", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram("spamgpt_batch_size", "Texts per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("spamgpt_queue_depth", "Texts waiting for the model", registry=r)
        # reason "deadline": request_timeout_s passed before any of the request's texts ran (a 504);
        # "cancelled": the request stopped waiting, because its client disconnected (a 499) or the server gave up
        self.dropped_texts = Counter("spamgpt_dropped_texts", "Texts taken off the queue unrun", ["reason"], registry=r)
        # Texts answered with a model_error (500) instead of probabilities, by cause ("non_finite_logits")
        self.model_errors = Counter("spamgpt_model_errors", "Texts the model failed on", ["cause"], registry=r)
        # Texts answered with probabilities, by the model that answered (a text asked of several counts for each)
        self.model_texts = Counter("spamgpt_model_texts", "Texts answered, by model", ["model"], registry=r)
        # Models added, replaced, removed, or refused (a checkpoint that failed its checks), through the admin API
        self.model_changes = Counter(
            "spamgpt_model_changes", "Changes to the served models", ["model", "change"], registry=r
        )

        # spamd-protocol requests (app.spamd) by command ("-" when unreadable) and answer (EX_OK, EX_PROTOCOL, ...)
        self.spamd_requests = Counter(
            "spamgpt_spamd_requests", "spamd-protocol requests", ["command", "status"], registry=r
        )

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)
