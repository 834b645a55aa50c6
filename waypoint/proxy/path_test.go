package proxy_test

import (
	"net/http"
	"testing"

	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	rbachttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/amber-mesh/amber/test/waypointgolden"
)

const denyAdmin = "ns[default]-policy[productpage-deny-admin]-rule[0]"

// denyGolden is the authz-deny-audit scenario with its DENY on /admin*
// and /debug/pprof applying to every caller (istiod's rule has
// notNamespaces [default] and an ipBlock; sleep, in default, would be
// spared), so that sleep — whom the ALLOW admits for GET — can try to get
// around it. edit changes the HCM further.
func denyGolden(t *testing.T, edit func(*hcmv3.HttpConnectionManager)) *waypointgolden.Snapshot {
	s := golden(t, "authz-deny-audit")
	editHCM(t, s, productpageChain, func(h *hcmv3.HttpConnectionManager) {
		for _, f := range h.GetHttpFilters() {
			if f.GetName() != "envoy.filters.http.rbac" {
				continue
			}
			r := &rbachttpv3.RBAC{}
			if err := f.GetTypedConfig().UnmarshalTo(r); err != nil {
				t.Fatal(err)
			}
			if p := r.GetRules().GetPolicies()[denyAdmin]; p != nil {
				p.Principals = []*rbacv3.Principal{{Identifier: &rbacv3.Principal_Any{Any: true}}}
				a, err := anypb.New(r)
				if err != nil {
					t.Fatal(err)
				}
				f.ConfigType = &hcmv3.HttpFilter_TypedConfig{TypedConfig: a}
			}
		}
		if edit != nil {
			edit(h)
		}
	})
	return s
}

// TestPathNormalizationBypass: the spellings of a denied path are
// normalised before RBAC sees them; what RBAC does not deny reaches the
// application exactly as RBAC saw it.
func TestPathNormalizationBypass(t *testing.T) {
	m := newMesh(t, meshOptions{})
	m.wp.Update(compile(t, denyGolden(t, nil)))
	sleep := m.sleep()
	app := m.pods["productpage-v1"].app
	for _, tc := range []struct {
		path   string
		status int
		app    string // what the application sees when forwarded
	}{
		{"/productpage", 200, "/productpage"},
		{"/admin", 403, ""},
		{"/productpage/../admin/x", 403, ""},
		{"/productpage/%2e%2e/admin", 403, ""},
		{"/productpage/%2E%2E/%2E/admin", 403, ""},
		{"/%61dmin", 403, ""},
		{`/x\..\admin`, 403, ""},
		{"/./debug/pprof", 403, ""},
		{"/productpage/./a/../b", 200, "/productpage/b"},
		// "%2%65" is no escape: the request line is refused (Envoy would
		// decode "%65" and refuse the path whose normal form changes when
		// normalised again; either way a 400).
		{"/public/%2%65%2%65/admin", 400, ""},
		// Double encoding stays encoded: the application sees what RBAC
		// saw and must not decode twice (as behind Envoy).
		{"/public/%252e%252e/admin", 200, "/public/%252e%252e/admin"},
		// Escaped slashes stay as they are (istiod's KEEP_UNCHANGED): the
		// application gets the same path RBAC did not match.
		{"/x/..%2Fadmin", 200, "/x/..%2Fadmin"},
		{"/admin%2Fx", 403, ""},
		// merge_slashes is off by istiod's default: "//admin" is not
		// "/admin" to RBAC, and the application sees "//admin" — as
		// behind Envoy. Mesh config pathNormalization MERGE_SLASHES turns
		// it on (below).
		{"//admin", 200, "//admin"},
	} {
		before := len(app.requests())
		resp, body := sleep.raw(t, productpageVIP, "GET "+tc.path+" HTTP/1.1\r\nHost: productpage\r\nConnection: close\r\n\r\n", true)
		if resp.StatusCode != tc.status {
			t.Errorf("GET %s: %d %q, want %d", tc.path, resp.StatusCode, body, tc.status)
			continue
		}
		got := app.requests()[before:]
		switch {
		case tc.app == "" && len(got) != 0:
			t.Errorf("GET %s reached the application as %+v", tc.path, got)
		case tc.app != "" && (len(got) != 1 || got[0].URI != tc.app):
			t.Errorf("GET %s: the application saw %+v, want %s", tc.path, got, tc.app)
		}
		if tc.status == 403 {
			if lines := m.logs.lines(map[string]any{"status": 403, "rbac.policy": denyAdmin}); len(lines) == 0 {
				t.Errorf("GET %s: not denied by %s", tc.path, denyAdmin)
			}
		}
	}
	if n := m.refused("request_target"); n != 1 {
		t.Errorf("request_target %v, want 1", n)
	}

	t.Run("merge_slashes", func(t *testing.T) {
		m.wp.Update(compile(t, denyGolden(t, func(h *hcmv3.HttpConnectionManager) { h.MergeSlashes = true })))
		if resp, _ := do(t, sleep.http1(productpageVIP), "GET", "http://productpage:9080//admin", nil, nil); resp.StatusCode != 403 {
			t.Errorf("//admin with merge_slashes: %d, want 403", resp.StatusCode)
		}
	})
	t.Run("escaped slashes refused", func(t *testing.T) {
		m.wp.Update(compile(t, denyGolden(t, func(h *hcmv3.HttpConnectionManager) {
			h.PathWithEscapedSlashesAction = hcmv3.HttpConnectionManager_REJECT_REQUEST
		})))
		resp, _ := sleep.raw(t, productpageVIP, "GET /x/..%2Fadmin HTTP/1.1\r\nHost: productpage\r\n\r\n", false)
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("%d, want 400", resp.StatusCode)
		}
	})
	t.Run("escaped slashes redirected", func(t *testing.T) {
		m.wp.Update(compile(t, denyGolden(t, func(h *hcmv3.HttpConnectionManager) {
			h.PathWithEscapedSlashesAction = hcmv3.HttpConnectionManager_UNESCAPE_AND_REDIRECT
		})))
		resp, _ := sleep.raw(t, productpageVIP, "GET /x/..%2Fadmin HTTP/1.1\r\nHost: productpage\r\n\r\n", false)
		if resp.StatusCode != http.StatusTemporaryRedirect || resp.Header.Get("Location") != "/admin" {
			t.Errorf("%d location %q, want 307 /admin", resp.StatusCode, resp.Header.Get("Location"))
		}
	})
}
