package rep

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the rep's Prometheus metrics.
type Metrics struct {
	instances      *prometheus.GaugeVec
	allocatedMB    prometheus.Gauge
	evacuating     prometheus.Gauge
	starts         prometheus.Counter
	startSeconds   prometheus.Histogram
	crashes        prometheus.Counter
	rejected       *prometheus.CounterVec
	dropletFetches prometheus.Counter
	leaseLosses    prometheus.Counter
}

// NewMetrics creates the metrics and registers them on reg (nil: not
// registered, for tests).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		instances: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: "basin", Subsystem: "rep",
			Name: "instances", Help: "Instances the cell holds, by phase."}, []string{"phase"}),
		allocatedMB: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "basin", Subsystem: "rep",
			Name: "allocated_memory_mb", Help: "Memory reserved by instances and tasks."}),
		evacuating: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "basin", Subsystem: "rep",
			Name: "evacuating", Help: "1 while the cell evacuates."}),
		starts: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "basin", Subsystem: "rep",
			Name: "lrp_starts_total", Help: "Instances that became RUNNING."}),
		startSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: "basin", Subsystem: "rep",
			Name: "lrp_start_seconds", Help: "From Perform to RUNNING and routed.",
			Buckets: prometheus.ExponentialBuckets(0.05, 2, 12)}),
		crashes: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "basin", Subsystem: "rep",
			Name: "lrp_crashes_total", Help: "Crashes reported to the BBS."}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "basin", Subsystem: "rep",
			Name: "perform_rejected_total", Help: "Work Perform rejected, by kind."}, []string{"kind"}),
		dropletFetches: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "basin", Subsystem: "rep",
			Name: "droplet_fetches_total", Help: "Droplets downloaded into the cache."}),
		leaseLosses: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "basin", Subsystem: "rep",
			Name: "lease_losses_total", Help: "Times the presence lease was lost and the cell registered again."}),
	}
	if reg != nil {
		reg.MustRegister(m.instances, m.allocatedMB, m.evacuating, m.starts, m.startSeconds, m.crashes,
			m.rejected, m.dropletFetches, m.leaseLosses)
	}
	return m
}

func (p lrpPhase) String() string {
	switch p {
	case phaseReserved:
		return "reserved"
	case phaseClaimed:
		return "claimed"
	case phaseRunning:
		return "running"
	}
	return "stopping"
}

func (r *Rep) updateGauges() {
	r.mu.Lock()
	counts := map[lrpPhase]int{}
	for _, l := range r.lrps {
		counts[l.phase]++
	}
	mem, _, _ := r.allocatedLocked()
	r.mu.Unlock()
	for _, p := range []lrpPhase{phaseReserved, phaseClaimed, phaseRunning, phaseStopping} {
		r.m.instances.WithLabelValues(p.String()).Set(float64(counts[p]))
	}
	r.m.allocatedMB.Set(float64(mem))
}
