package cniinstall

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

const ptpList = `{
  "cniVersion": "1.0.0",
  "name": "kindnet",
  "plugins": [
    {"type": "ptp", "ipMasq": false, "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}`

type layout struct {
	cfg  Config
	conf string
	bin  string
}

func newLayout(t *testing.T, files map[string]string) layout {
	t.Helper()
	dir := t.TempDir()
	l := layout{conf: filepath.Join(dir, "net.d"), bin: filepath.Join(dir, "bin")}
	os.MkdirAll(l.conf, 0o755)
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(l.conf, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	src := filepath.Join(dir, "amber-cni-src")
	os.WriteFile(src, []byte("#!plugin v1"), 0o755)
	l.cfg = Config{BinDir: l.bin, ConfDir: l.conf, Source: src, Plugin: map[string]any{"agentSocket": "/run/x.sock"}}
	return l
}

func plugins(t *testing.T, path string) []map[string]any {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var l struct {
		Name    string           `json:"name"`
		Plugins []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(data, &l); err != nil {
		t.Fatal(err)
	}
	return l.Plugins
}

func TestInstallChainsAtTheEnd(t *testing.T) {
	l := newLayout(t, map[string]string{"10-kindnet.conflist": ptpList, "99-other.conflist": ptpList})
	path, err := Install(l.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if path != filepath.Join(l.conf, "10-kindnet.conflist") {
		t.Fatalf("chained into %s, want the first file", path)
	}
	ps := plugins(t, path)
	if len(ps) != 3 || ps[0]["type"] != "ptp" || ps[1]["type"] != "portmap" || ps[2]["type"] != PluginType || ps[2]["agentSocket"] != "/run/x.sock" {
		t.Fatalf("plugins %v", ps)
	}
	if ps[0]["ipam"] == nil {
		t.Fatal("primary plugin's settings lost")
	}
	if len(plugins(t, filepath.Join(l.conf, "99-other.conflist"))) != 2 {
		t.Fatal("inactive configuration touched")
	}
	if data, err := os.ReadFile(filepath.Join(l.bin, PluginType)); err != nil || string(data) != "#!plugin v1" {
		t.Fatalf("binary %q %v", data, err)
	}
	if ok, err := Chained(l.cfg); err != nil || !ok {
		t.Fatalf("Chained = %v %v", ok, err)
	}

	// Idempotent: a second install changes nothing.
	st1, _ := os.Stat(path)
	if _, err := Install(l.cfg); err != nil {
		t.Fatal(err)
	}
	st2, _ := os.Stat(path)
	if !os.SameFile(st1, st2) {
		t.Fatal("configuration rewritten although unchanged")
	}

	// The primary CNI rewrites its file: the next install re-chains.
	os.WriteFile(path, []byte(ptpList), 0o644)
	if ok, _ := Chained(l.cfg); ok {
		t.Fatal("Chained after rewrite")
	}
	if _, err := Install(l.cfg); err != nil {
		t.Fatal(err)
	}
	if ps := plugins(t, path); len(ps) != 3 || ps[2]["type"] != PluginType {
		t.Fatalf("not re-chained: %v", ps)
	}

	// A new plugin binary replaces the old one.
	os.WriteFile(l.cfg.Source, []byte("#!plugin v2"), 0o755)
	Install(l.cfg)
	if data, _ := os.ReadFile(filepath.Join(l.bin, PluginType)); string(data) != "#!plugin v2" {
		t.Fatalf("binary not updated: %q", data)
	}

	if err := Uninstall(l.cfg); err != nil {
		t.Fatal(err)
	}
	if ps := plugins(t, path); len(ps) != 2 || ps[1]["type"] != "portmap" {
		t.Fatalf("after uninstall: %v", ps)
	}
	if _, err := os.Stat(filepath.Join(l.bin, PluginType)); !os.IsNotExist(err) {
		t.Fatal("binary left after uninstall")
	}
	if err := Uninstall(l.cfg); err != nil {
		t.Fatalf("second uninstall: %v", err)
	}
}

func TestInstallConvertsSingleConf(t *testing.T) {
	l := newLayout(t, map[string]string{"10-bridge.conf": `{"cniVersion":"0.4.0","name":"br","type":"bridge","bridge":"cni0"}`})
	path, err := Install(l.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if path != filepath.Join(l.conf, "10-bridge.conflist") {
		t.Fatalf("path %s", path)
	}
	if _, err := os.Stat(filepath.Join(l.conf, "10-bridge.conf")); !os.IsNotExist(err) {
		t.Fatal(".conf left beside the .conflist")
	}
	ps := plugins(t, path)
	if len(ps) != 2 || ps[0]["type"] != "bridge" || ps[0]["bridge"] != "cni0" || ps[1]["type"] != PluginType {
		t.Fatalf("plugins %v", ps)
	}
}

func TestInstallWaitsForConfig(t *testing.T) {
	l := newLayout(t, nil)
	if _, err := Install(l.cfg); err == nil {
		t.Fatal("install without a configuration succeeded")
	}
	l2 := newLayout(t, map[string]string{"05-broken.conflist": "{", "10-ok.conflist": ptpList})
	path, err := Install(l2.cfg)
	if err != nil || filepath.Base(path) != "10-ok.conflist" {
		t.Fatalf("unparsable first file: %s %v", path, err)
	}
}
