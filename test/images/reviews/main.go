// Command reviews is Bookinfo's reviews service
// (samples/bookinfo/src/reviews in istio.io/istio, a Java application
// there) as a static Go program. One program plays the three versions,
// as one Java build does there, from the environment Istio's images set:
//
//	SERVICE_VERSION  v1, v2 or v3 (reported only)
//	ENABLE_RATINGS   "true": ask ratings for each reviewer's stars (v2, v3)
//	STAR_COLOR       the stars' color (v2 black, v3 red; default black)
//
// GET /reviews/ID answers two reviews as JSON, with "podname" the pod that
// answered (HOSTNAME) — productpage shows it, which is how Istio's
// walkthrough tells the versions apart — and with ENABLE_RATINGS each
// review's rating from GET ratings/ratings/ID, or an error when ratings
// does not answer (in 10 s for black stars, 2.5 s otherwise, as the
// original). GET /health answers that it is healthy.
package main

import (
	"cmp"
	"context"
	"fmt"
	"net/http"
	"os"
	"time"

	"github.com/amber-mesh/amber/test/images/bookinfo"
)

type rating struct {
	Stars int    `json:"stars,omitempty"`
	Color string `json:"color,omitempty"`
	Error string `json:"error,omitempty"`
}

type review struct {
	Reviewer string  `json:"reviewer"`
	Text     string  `json:"text"`
	Rating   *rating `json:"rating,omitempty"`
}

type reviews struct {
	ID          string   `json:"id"`
	Podname     string   `json:"podname"`
	Clustername string   `json:"clustername"`
	Reviews     []review `json:"reviews"`
}

func main() {
	withRatings := os.Getenv("ENABLE_RATINGS") == "true"
	color := cmp.Or(os.Getenv("STAR_COLOR"), "black")
	pod := os.Getenv("HOSTNAME")
	if pod == "" {
		pod, _ = os.Hostname()
	}
	// The Java original prints an unset CLUSTER_NAME as "null", which
	// productpage's template tests for.
	cluster := cmp.Or(os.Getenv("CLUSTER_NAME"), "null")
	timeout := 10 * time.Second
	if color != "black" {
		timeout = 2500 * time.Millisecond
	}
	client := bookinfo.Client(timeout)
	ratingsURL := bookinfo.ServiceURL("ratings") + "/ratings/"

	bookinfo.ServeBackend("reviews", func(w http.ResponseWriter, r *http.Request, id int) {
		out := reviews{ID: fmt.Sprint(id), Podname: pod, Clustername: cluster, Reviews: []review{
			{Reviewer: "Reviewer1", Text: "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"},
			{Reviewer: "Reviewer2", Text: "Absolutely fun and entertaining. The play lacks thematic depth when compared to other plays by Shakespeare."},
		}}
		if withRatings {
			stars := ratingsFor(r.Context(), client, fmt.Sprint(ratingsURL, id), bookinfo.Forward(r))
			for i := range out.Reviews {
				if s, ok := stars[out.Reviews[i].Reviewer]; ok {
					out.Reviews[i].Rating = &rating{Stars: s, Color: color}
				} else {
					out.Reviews[i].Rating = &rating{Error: "Ratings service is currently unavailable"}
				}
			}
		}
		bookinfo.WriteJSON(w, http.StatusOK, out)
	})
}

// ratingsFor returns each reviewer's stars from ratings, none when it
// failed (logged).
func ratingsFor(ctx context.Context, c *http.Client, url string, h http.Header) map[string]int {
	var body struct {
		Ratings map[string]int `json:"ratings"`
	}
	if _, err := bookinfo.GetJSON(ctx, c, url, h, &body); err != nil {
		fmt.Fprintf(os.Stderr, "Error: unable to contact %s: %v\n", url, err)
		return nil
	}
	return body.Ratings
}
