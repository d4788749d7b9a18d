package stack

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestAptSources(t *testing.T) {
	root := t.TempDir()
	files := map[string]string{
		"sources.list": "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main contrib\ndeb-src http://mirror.example/debian bookworm main\ndeb cdrom:[x]/ bookworm main\n",
		"sources.list.d/debian.sources": "Types: deb deb-src\nURIs: http://a.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n" +
			"Types: deb\nURIs: http://a.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n" +
			"Enabled: no\nTypes: deb\nURIs: http://off.example/\nSuites: bookworm\nComponents: main\n",
		"sources.list.d/other.list":       "deb https://vendor.example/apt cloud-sdk-bookworm main\n",
		"sources.list.d/ignored.disabled": "deb http://never.example/ bookworm main\n",
	}
	for name, body := range files {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	all, err := AptSources(root)
	if err != nil {
		t.Fatal(err)
	}
	got := suiteSources(all, "bookworm")
	want := []AptSource{
		{URI: "http://mirror.example/debian", Suite: "bookworm", Components: []string{"main", "contrib"}},
		{URI: "http://a.example/debian", Suite: "bookworm", Components: []string{"main"}},
		{URI: "http://a.example/debian", Suite: "bookworm-updates", Components: []string{"main"}},
		{URI: "http://a.example/debian-security", Suite: "bookworm-security", Components: []string{"main"}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("bookworm sources:\n got %+v\nwant %+v", got, want)
	}
}

func TestBookwormDigestStable(t *testing.T) {
	if BookwormDigest() != BookwormDigest() {
		t.Fatal("digest changes between calls")
	}
	if BookwormDir(BookwormOptions{CacheDir: "/c"})[:len("/c/stacks/bookworm-")] != "/c/stacks/bookworm-" {
		t.Errorf("BookwormDir = %s", BookwormDir(BookwormOptions{CacheDir: "/c"}))
	}
}
