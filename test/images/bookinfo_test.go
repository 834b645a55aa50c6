package images

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/amber-mesh/amber/test/proc"
)

// TestBookinfo runs the four Bookinfo programs as processes on loopback,
// wired to each other as Kubernetes would (NAME_HOSTNAME and
// NAME_SERVICE_PORT), and reads productpage's page as Istio's walkthrough
// does: it names the reviews pod that answered on a line of its own, shows
// stars only when reviews asks ratings, passes the user's headers down the
// chain, and answers 200 with an error in the page when a backend fails.
func TestBookinfo(t *testing.T) {
	if testing.Short() {
		t.Skip("builds four binaries")
	}
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	bin := t.TempDir()
	cmd := exec.Command("go", "build", "-o", bin+"/", "./test/images/productpage", "./test/images/details", "./test/images/reviews", "./test/images/ratings")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}

	// A ratings stand-in that records what reached it, for the headers.
	var mu sync.Mutex
	var endUsers []string
	ratings := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		endUsers = append(endUsers, r.Header.Get("end-user"))
		mu.Unlock()
		fmt.Fprint(w, `{"id":0,"ratings":{"Reviewer1":5,"Reviewer2":4}}`)
	}))
	t.Cleanup(ratings.Close)
	ratingsPort := strconv.Itoa(ratings.Listener.Addr().(*net.TCPAddr).Port)

	run := func(name string, env ...string) string {
		t.Helper()
		port := freePort(t)
		env = append(os.Environ(), append(env, "PORT="+port,
			"DETAILS_HOSTNAME=127.0.0.1", "REVIEWS_HOSTNAME=127.0.0.1", "RATINGS_HOSTNAME=127.0.0.1")...)
		p, err := proc.Start(name, filepath.Join(bin, strings.Fields(name)[0]), nil, env, "", filepath.Join(t.TempDir(), "log"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = p.Stop(5 * time.Second) })
		waitHTTP(t, "http://127.0.0.1:"+port+"/health")
		return port
	}
	details := run("details")
	real := run("ratings")
	v1 := run("reviews v1", "SERVICE_VERSION=v1", "HOSTNAME=reviews-v1-7f99cc4496-gdxfn")
	v2 := run("reviews v2", "SERVICE_VERSION=v2", "ENABLE_RATINGS=true", "HOSTNAME=reviews-v2-5b667bcbf8-4cxvk", "RATINGS_SERVICE_PORT="+real)
	v3 := run("reviews v3", "SERVICE_VERSION=v3", "ENABLE_RATINGS=true", "STAR_COLOR=red", "HOSTNAME=reviews-v3-5b9bd44f4-6rgv2", "RATINGS_SERVICE_PORT="+ratingsPort)
	v3Alone := run("reviews v3", "SERVICE_VERSION=v3", "ENABLE_RATINGS=true", "STAR_COLOR=red", "HOSTNAME=reviews-v3-5b9bd44f4-6rgv2", "RATINGS_SERVICE_PORT="+freePort(t))

	servedBy := regexp.MustCompile(`(?m)^reviews-v.-.*$`)
	for _, tc := range []struct {
		name, reviews, details string
		want, not              []string
		pod                    string
	}{
		{name: "v1: no stars", reviews: v1, details: details, pod: "reviews-v1-7f99cc4496-gdxfn",
			want: []string{"Book Details", "PublisherA", "Book Reviews", "Reviewer1"}, not: []string{"glyphicon-star", "Error fetching"}},
		{name: "v2: black stars from ratings", reviews: v2, details: details, pod: "reviews-v2-5b667bcbf8-4cxvk",
			want: []string{`<font color="black">`, "Book Details"}},
		{name: "v3: red stars, the user's headers passed on", reviews: v3, details: details, pod: "reviews-v3-5b9bd44f4-6rgv2",
			want: []string{`<font color="red">`}},
		{name: "v3: ratings unreachable", reviews: v3Alone, details: details, pod: "reviews-v3-5b9bd44f4-6rgv2",
			want: []string{"Ratings service is currently unavailable"}, not: []string{"glyphicon-star"}},
		{name: "details unreachable", reviews: v1, details: freePort(t), pod: "reviews-v1-7f99cc4496-gdxfn",
			want: []string{"Error fetching product details", "Sorry, product details are currently unavailable for this book."}},
		{name: "reviews unreachable", reviews: freePort(t), details: details,
			want: []string{"Error fetching product reviews", "Sorry, product reviews are currently unavailable for this book.", "Book Details"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pp := run("productpage", "DETAILS_SERVICE_PORT="+tc.details, "REVIEWS_SERVICE_PORT="+tc.reviews, "RATINGS_SERVICE_PORT="+real)
			req, _ := http.NewRequest(http.MethodGet, "http://127.0.0.1:"+pp+"/productpage", nil)
			req.Header.Set("end-user", "jason")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			page := string(body)
			if resp.StatusCode != http.StatusOK {
				t.Errorf("status %s, want 200 whatever the backends did", resp.Status)
			}
			for _, w := range tc.want {
				if !strings.Contains(page, w) {
					t.Errorf("page lacks %q:\n%s", w, page)
				}
			}
			for _, n := range tc.not {
				if strings.Contains(page, n) {
					t.Errorf("page has %q:\n%s", n, page)
				}
			}
			got := servedBy.FindAllString(page, -1)
			if tc.pod == "" && len(got) != 0 || tc.pod != "" && (len(got) != 2 || got[0] != tc.pod) {
				t.Errorf("lines matching reviews-v.-: %q, want %q once per review", got, tc.pod)
			}
			if tc.name == "v2: black stars from ratings" && strings.Count(page, `"glyphicon glyphicon-star"`) != 9 {
				t.Errorf("want 5 + 4 stars:\n%s", page)
			}
		})
	}
	mu.Lock()
	defer mu.Unlock()
	if len(endUsers) == 0 || endUsers[0] != "jason" {
		t.Errorf("end-user headers that reached ratings through productpage and reviews: %q", endUsers)
	}
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
}

// waitHTTP polls url until it answers 200 (the process listens), for at
// most 20 s.
func waitHTTP(t *testing.T, url string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s: %v", url, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
