package istiod_test

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/amber-mesh/amber/test/istiod"
)

// TestIntegrationChartConfigMaps renders istiod's chart from the pinned
// module with helm, as test/cluster does before it starts istiod: the
// mesh configuration of the ambient profile (a superset of MeshConfig,
// which the goldens use) and the injector configuration with the
// templates istiod's deployment controller renders Gateways from.
func TestIntegrationChartConfigMaps(t *testing.T) {
	bin := istiod.Binaries(t)
	cms, err := istiod.RenderConfigMaps(context.Background(), istiod.Helm(t), filepath.Join(bin, istiod.ChartDir), istiod.ChartValues...)
	if err != nil {
		t.Fatal(err)
	}
	mesh, inj := cms[0], cms[1]
	if mesh.Name != istiod.MeshConfigMap || inj.Name != istiod.InjectorConfigMap {
		t.Fatalf("got ConfigMaps %s, %s", mesh.Name, inj.Name)
	}
	for _, cm := range cms {
		if cm.Namespace != istiod.Namespace {
			t.Errorf("%s in namespace %q, want %s", cm.Name, cm.Namespace, istiod.Namespace)
		}
	}

	var got, want map[string]any
	if err := yaml.Unmarshal([]byte(mesh.Data["mesh"]), &got); err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal([]byte(istiod.MeshConfig), &want); err != nil {
		t.Fatal(err)
	}
	for k, v := range want {
		if k == "defaultConfig" {
			continue
		}
		if !jsonEqual(got[k], v) {
			t.Errorf("mesh %s = %v, MeshConfig says %v", k, got[k], v)
		}
	}
	dc, _ := got["defaultConfig"].(map[string]any)
	if dc["discoveryAddress"] != "istiod.istio-system.svc:15012" {
		t.Errorf("mesh defaultConfig.discoveryAddress = %v", dc["discoveryAddress"])
	}
	// The ambient profile: every proxy, waypoints included, speaks HBONE.
	if md, _ := dc["proxyMetadata"].(map[string]any); md["ISTIO_META_ENABLE_HBONE"] != "true" {
		t.Errorf("mesh defaultConfig.proxyMetadata = %v, want ISTIO_META_ENABLE_HBONE from the ambient profile", dc["proxyMetadata"])
	}

	var cfg struct {
		Templates map[string]string `json:"templates"`
	}
	if err := yaml.Unmarshal([]byte(inj.Data["config"]), &cfg); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"waypoint", "kube-gateway", "gateway", "sidecar"} {
		if strings.TrimSpace(cfg.Templates[name]) == "" {
			t.Errorf("injector config has no %q template (templates: %d)", name, len(cfg.Templates))
		}
	}
	if !strings.Contains(cfg.Templates["waypoint"], "- waypoint") || !strings.Contains(cfg.Templates["waypoint"], "name: istio-proxy") {
		t.Errorf("waypoint template does not run `proxy waypoint` in container istio-proxy:\n%s", cfg.Templates["waypoint"])
	}
	var values struct {
		Global struct {
			Hub   string `json:"hub"`
			Proxy struct {
				Image string `json:"image"`
			} `json:"proxy"`
		} `json:"global"`
	}
	if err := json.Unmarshal([]byte(inj.Data["values"]), &values); err != nil {
		t.Fatalf("injector values: %v", err)
	}
	if values.Global.Hub == "" || values.Global.Proxy.Image != "proxyv2" {
		t.Errorf("injector values: hub %q, proxy image %q", values.Global.Hub, values.Global.Proxy.Image)
	}
}

func jsonEqual(a, b any) bool {
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return string(ja) == string(jb)
}
