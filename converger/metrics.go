package converger

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	leader      prometheus.Gauge
	passSeconds prometheus.Histogram
	repairs     *prometheus.CounterVec
	cellsLost   prometheus.Counter
	errors      prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		leader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "basin_converger_leader", Help: "1 while this replica leads.",
		}),
		passSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "basin_converger_full_pass_duration_seconds", Help: "Time of one full comparison of desired and actual state.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 16),
		}),
		repairs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "basin_converger_repairs_total", Help: "Repairs made, by kind (unclaim, retire, create, fail_task, resolve_task).",
		}, []string{"kind"}),
		cellsLost: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "basin_converger_cells_lost_total", Help: "Cells whose presence key went away.",
		}),
		errors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "basin_converger_read_errors_total", Help: "Passes cut short by a failed read.",
		}),
	}
	reg.MustRegister(m.leader, m.passSeconds, m.repairs, m.cellsLost, m.errors)
	return m
}
