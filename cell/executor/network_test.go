package executor

import (
	"errors"
	"testing"
)

func TestAllocateHostPorts(t *testing.T) {
	// Port bp is held by another process and is skipped.
	const bp = 61000
	n := &network{hostIP: "127.0.0.1", portLow: bp, portHigh: bp + 3, next: bp, allocated: map[int]bool{},
		free: func(p int) bool { return p != bp }}

	tests := []struct {
		name    string
		count   int
		want    []uint16
		wantErr error
	}{
		{"skips the busy port", 2, []uint16{uint16(bp + 1), uint16(bp + 2)}, nil},
		{"takes the last free one", 1, []uint16{uint16(bp + 3)}, nil},
		{"range exhausted", 1, nil, ErrNoPorts},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := n.allocate(tc.count)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("allocate(%d) error = %v, want %v", tc.count, err, tc.wantErr)
			}
			if len(got) != len(tc.want) {
				t.Fatalf("allocate(%d) = %v, want %v", tc.count, got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Errorf("allocate(%d) = %v, want %v", tc.count, got, tc.want)
				}
			}
		})
	}

	n.release([]PortMapping{{HostPort: uint16(bp + 2)}})
	got, err := n.allocate(1)
	if err != nil || len(got) != 1 || got[0] != uint16(bp+2) {
		t.Errorf("after release allocate = %v, %v; want [%d]", got, err, bp+2)
	}
	n.reserve([]PortMapping{{HostPort: uint16(bp + 2)}})
	if _, err := n.allocate(1); !errors.Is(err, ErrNoPorts) {
		t.Errorf("allocate after reserve = %v, want %v", err, ErrNoPorts)
	}
}
