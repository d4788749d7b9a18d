package bbs

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	batchSize      prometheus.Histogram
	batchSplits    prometheus.Counter
	txnSeconds     prometheus.Histogram
	conflicts      prometheus.Counter
	eventsSent     prometheus.Counter
	subscribers    prometheus.Gauge
	droppedSubs    prometheus.Counter
	requests       *prometheus.CounterVec
	requestSeconds *prometheus.HistogramVec
	desiredReads   *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		batchSize: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "basin_bbs_txn_batch_size", Help: "Guarded writes merged into one etcd transaction.",
			Buckets: []float64{1, 2, 4, 8, 16, 32, 64, 128},
		}),
		batchSplits: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "basin_bbs_txn_batch_splits_total", Help: "Merged transactions that failed a compare and were re-run item by item.",
		}),
		txnSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "basin_bbs_txn_seconds", Help: "Latency of the etcd transactions the committer sends.",
			Buckets: prometheus.ExponentialBuckets(0.0002, 2, 16),
		}),
		conflicts: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "basin_bbs_write_conflicts_total", Help: "Guarded writes that lost to a concurrent write.",
		}),
		eventsSent: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "basin_bbs_events_published_total", Help: "Events published to subscribers.",
		}),
		subscribers: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "basin_bbs_event_subscribers", Help: "Open event subscriptions.",
		}),
		droppedSubs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "basin_bbs_event_subscribers_dropped_total", Help: "Subscribers dropped for falling behind.",
		}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "basin_bbs_requests_total", Help: "gRPC requests by method and code.",
		}, []string{"method", "code"}),
		requestSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "basin_bbs_request_seconds", Help: "gRPC request latency by method.",
			Buckets: prometheus.ExponentialBuckets(0.0002, 2, 16),
		}, []string{"method"}),
		desiredReads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "basin_bbs_desired_reads_at_revision_total",
			Help: "Desired LRP reads with a minimum revision, by where they were answered: view, or etcd when the view did not get there in time.",
		}, []string{"source"}),
	}
	if reg != nil {
		reg.MustRegister(m.batchSize, m.batchSplits, m.txnSeconds, m.conflicts, m.eventsSent, m.subscribers, m.droppedSubs, m.requests, m.requestSeconds, m.desiredReads)
	}
	return m
}
