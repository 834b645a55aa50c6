// Command ratings is Bookinfo's ratings service
// (samples/bookinfo/src/ratings/ratings.js in istio.io/istio, the version
// that keeps ratings in memory) as a static Go program: GET /ratings/ID
// answers both reviewers' stars as JSON, GET /health that it is healthy.
package main

import (
	"net/http"

	"github.com/amber-mesh/amber/test/images/bookinfo"
)

func main() {
	bookinfo.ServeBackend("ratings", func(w http.ResponseWriter, _ *http.Request, id int) {
		bookinfo.WriteJSON(w, http.StatusOK, map[string]any{"id": id, "ratings": map[string]int{"Reviewer1": 5, "Reviewer2": 4}})
	})
}
