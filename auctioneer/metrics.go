package auctioneer

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	leader         prometheus.Gauge
	queued         prometheus.Gauge
	batchSize      prometheus.Histogram
	auctionSeconds prometheus.Histogram
	placements     prometheus.Counter
	failures       *prometheus.CounterVec
	cellErrors     prometheus.Counter
	cellStates     prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		leader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "basin_auctioneer_leader", Help: "1 while this replica leads.",
		}),
		queued: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "basin_auctioneer_queued", Help: "Instances and tasks in the auction queue.",
		}),
		batchSize: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "basin_auctioneer_batch_size", Help: "Items per auction.",
			Buckets: prometheus.ExponentialBuckets(1, 4, 8),
		}),
		auctionSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "basin_auctioneer_auction_duration_seconds", Help: "Time from batch to plan: reading work and cell states, placing.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}),
		placements: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "basin_auctioneer_placements_total", Help: "Instances and tasks sent to a cell (rate() gives placements/s).",
		}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "basin_auctioneer_placement_failures_total", Help: "Work given a placement error, by reason.",
		}, []string{"reason"}),
		cellErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "basin_auctioneer_cell_state_errors_total", Help: "Cells left out of an auction because State failed or timed out.",
		}),
		cellStates: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "basin_auctioneer_cell_states_total", Help: "State answers fetched from cells (auctions in between use them, adjusted for what they placed).",
		}),
	}
	reg.MustRegister(m.leader, m.queued, m.batchSize, m.auctionSeconds, m.placements, m.failures, m.cellErrors, m.cellStates)
	return m
}
