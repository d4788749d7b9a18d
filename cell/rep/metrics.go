package rep

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the rep's Prometheus metrics.
type Metrics struct {
	cell           *cellCollector
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
		cell: &cellCollector{
			instances: prometheus.NewDesc(prometheus.BuildFQName("basin", "rep", "instances"),
				"Instances the cell holds, by phase.", []string{"phase"}, nil),
			allocatedMB: prometheus.NewDesc(prometheus.BuildFQName("basin", "rep", "allocated_memory_mb"),
				"Memory reserved by instances and tasks.", nil, nil),
		},
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
		reg.MustRegister(m.cell, m.evacuating, m.starts, m.startSeconds, m.crashes,
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

// cellCollector reports the instances by phase and the memory reserved,
// counted from the rep's state when scraped: counting on every change walked
// every instance of the cell per start.
type cellCollector struct {
	instances   *prometheus.Desc
	allocatedMB *prometheus.Desc

	mu    sync.Mutex
	state func() (byPhase map[lrpPhase]int, memMB int64) // nil until a Rep is attached
}

var _ prometheus.Collector = (*cellCollector)(nil)

// attach makes the collector report state, the last Rep created with these
// metrics.
func (c *cellCollector) attach(state func() (map[lrpPhase]int, int64)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.state = state
}

func (c *cellCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.instances
	ch <- c.allocatedMB
}

func (c *cellCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	state := c.state
	c.mu.Unlock()
	var mem int64
	if state != nil {
		var byPhase map[lrpPhase]int
		byPhase, mem = state()
		for _, p := range []lrpPhase{phaseReserved, phaseClaimed, phaseRunning, phaseStopping} {
			ch <- prometheus.MustNewConstMetric(c.instances, prometheus.GaugeValue, float64(byPhase[p]), p.String())
		}
	}
	ch <- prometheus.MustNewConstMetric(c.allocatedMB, prometheus.GaugeValue, float64(mem))
}

// gauges counts the cell's instances by phase and the memory reserved by
// instances and tasks.
func (r *Rep) gauges() (map[lrpPhase]int, int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	byPhase := map[lrpPhase]int{}
	for _, l := range r.lrps {
		byPhase[l.phase]++
	}
	mem, _, _ := r.allocatedLocked()
	return byPhase, mem
}
