package proxy

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the data path's Prometheus series.
type Metrics struct {
	requests         [6]prometheus.Counter // by status class; [0] for anything else
	latency          prometheus.Histogram
	endpointFailures *prometheus.CounterVec
}

// NewMetrics registers the series on reg; a nil reg keeps them unregistered.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	byClass := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "basin", Subsystem: "router", Name: "requests_total",
		Help: "Requests served, by status class (499: client gone).",
	}, []string{"class"})
	m := &Metrics{
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "basin", Subsystem: "router", Name: "request_duration_seconds",
			Help:    "Time from request head to the end of the response.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}),
		endpointFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "basin", Subsystem: "router", Name: "endpoint_failures_total",
			Help: "Failed exchanges with endpoints, by kind (dial, timeout, protocol, body).",
		}, []string{"kind"}),
	}
	// Resolve the label lookups once: the hot path only increments.
	for i, class := range []string{"other", "1xx", "2xx", "3xx", "4xx", "5xx"} {
		m.requests[i] = byClass.WithLabelValues(class)
	}
	if reg != nil {
		reg.MustRegister(byClass, m.latency, m.endpointFailures)
	}
	return m
}

func (m *Metrics) observe(status int, d time.Duration) {
	class := status / 100
	if class < 1 || class > 5 {
		class = 0
	}
	m.requests[class].Inc()
	m.latency.Observe(d.Seconds())
}
