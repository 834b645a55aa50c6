// Command productpage is Bookinfo's front end
// (samples/bookinfo/src/productpage/productpage.py in istio.io/istio) as
// a static Go program. GET /productpage asks details for the book's
// details (3 s) and reviews for its reviews (two tries of 3 s), each on a
// connection of its own, and renders an HTML page with both. The page
// names the reviews pod that answered ("Reviews served by:", then e.g.
// reviews-v2-5b667bcbf8-abcde on a line of its own, once per review), so
// that Istio's walkthrough counts versions with `grep reviews-v.-`. When a
// backend fails the page is still answered 200, as the original's is, and
// says so: "Error fetching product details" or "Error fetching product
// reviews" with the original's apology.
//
// Also as the original: / and /index.html (the services it calls),
// /health, and the JSON API /api/v1/products, /api/v1/products/ID,
// /api/v1/products/ID/reviews and /api/v1/products/ID/ratings.
package main

import (
	"context"
	"html/template"
	"log"
	"net/http"
	"strconv"
	"time"

	"github.com/amber-mesh/amber/test/images/bookinfo"
)

type product struct {
	ID              int           `json:"id"`
	Title           string        `json:"title"`
	DescriptionHTML template.HTML `json:"descriptionHtml"`
}

var products = []product{{
	ID:    0,
	Title: "The Comedy of Errors",
	DescriptionHTML: `<a href="https://en.wikipedia.org/wiki/The_Comedy_of_Errors">Wikipedia Summary</a>: The Comedy of Errors is one of <b>William Shakespeare's</b> early plays. ` +
		`It is his shortest and one of his most farcical comedies, with a major part of the humour coming from slapstick and mistaken identity, in addition to puns and word play.`,
}}

type rating struct {
	Stars int    `json:"stars"`
	Color string `json:"color"`
	Error string `json:"error"`
}

type reviews struct {
	Podname     string `json:"podname"`
	Clustername string `json:"clustername"`
	Reviews     []struct {
		Reviewer string  `json:"reviewer"`
		Text     string  `json:"text"`
		Rating   *rating `json:"rating"`
	} `json:"reviews"`
	Error string `json:"error"`
}

type details struct {
	ISBN10    string `json:"ISBN-10"`
	Publisher string `json:"publisher"`
	Pages     int    `json:"pages"`
	Type      string `json:"type"`
	Language  string `json:"language"`
	Error     string `json:"error"`
}

type page struct {
	Product       product
	DetailsStatus int
	Details       details
	ReviewsStatus int
	Reviews       reviews
}

var (
	detailsURL = bookinfo.ServiceURL("details")
	reviewsURL = bookinfo.ServiceURL("reviews")
	ratingsURL = bookinfo.ServiceURL("ratings")
	client     = bookinfo.Client(3 * time.Second)
)

func main() {
	mux := http.NewServeMux()
	index := func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		_ = indexHTML.Execute(w, []string{detailsURL + "/details", reviewsURL + "/reviews", ratingsURL + "/ratings"})
	}
	mux.HandleFunc("GET /{$}", index)
	mux.HandleFunc("GET /index.html", index)
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, _ *http.Request) {
		w.Write([]byte("Product page is healthy"))
	})
	mux.HandleFunc("GET /productpage", func(w http.ResponseWriter, r *http.Request) {
		h := bookinfo.Forward(r)
		p := page{Product: products[0]}
		p.DetailsStatus, p.Details = productDetails(r.Context(), 0, h)
		p.ReviewsStatus, p.Reviews = productReviews(r.Context(), 0, h)
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		if err := productpageHTML.Execute(w, p); err != nil {
			log.Printf("render: %v", err)
		}
	})
	mux.HandleFunc("GET /api/v1/products", func(w http.ResponseWriter, _ *http.Request) {
		bookinfo.WriteJSON(w, http.StatusOK, products)
	})
	mux.HandleFunc("GET /api/v1/products/{id}", func(w http.ResponseWriter, r *http.Request) {
		apiCall(w, r, "details", detailsURL+"/details/")
	})
	mux.HandleFunc("GET /api/v1/products/{id}/reviews", func(w http.ResponseWriter, r *http.Request) {
		apiCall(w, r, "reviews", reviewsURL+"/reviews/")
	})
	mux.HandleFunc("GET /api/v1/products/{id}/ratings", func(w http.ResponseWriter, r *http.Request) {
		apiCall(w, r, "ratings", ratingsURL+"/ratings/")
	})
	bookinfo.Serve("productpage", mux)
}

// productDetails asks details once, as the original does.
func productDetails(ctx context.Context, id int, h http.Header) (int, details) {
	var d details
	status, err := bookinfo.GetJSON(ctx, client, detailsURL+"/details/"+strconv.Itoa(id), h, &d)
	if err == nil {
		return status, d
	}
	log.Printf("details: %v", err)
	return failed(status), details{Error: "Sorry, product details are currently unavailable for this book."}
}

// productReviews asks reviews up to twice: the original does, on purpose
// ("Do not remove. Bug introduced explicitly for illustration in fault
// injection task").
func productReviews(ctx context.Context, id int, h http.Header) (int, reviews) {
	var status int
	for range 2 {
		var rv reviews
		var err error
		if status, err = bookinfo.GetJSON(ctx, client, reviewsURL+"/reviews/"+strconv.Itoa(id), h, &rv); err == nil {
			return status, rv
		}
		log.Printf("reviews: %v", err)
	}
	return failed(status), reviews{Error: "Sorry, product reviews are currently unavailable for this book."}
}

// apiCall answers the JSON API: the backend's answer for the product in
// the path, or its status (500 when it did not answer) with an error.
func apiCall(w http.ResponseWriter, r *http.Request, what, base string) {
	var v any
	status, err := bookinfo.GetJSON(r.Context(), client, base+r.PathValue("id"), bookinfo.Forward(r), &v)
	if err != nil {
		bookinfo.WriteJSON(w, failed(status), map[string]string{"error": "Sorry, product " + what + " are currently unavailable for this book."})
		return
	}
	bookinfo.WriteJSON(w, status, v)
}

// failed is the status the original reports for a failed call: the
// backend's, or 500 when there was none.
func failed(status int) int {
	if status == 0 || status == http.StatusOK {
		return http.StatusInternalServerError
	}
	return status
}

var indexHTML = template.Must(template.New("index").Parse(`<!DOCTYPE html>
<html>
<head><meta charset="utf-8"><title>Simple Bookstore App</title></head>
<body>
<h3>Hello! This is a simple bookstore application consisting of three services as shown below</h3>
<table>
<tr><th>name</th><td>productpage</td></tr>
{{range .}}<tr><th>calls</th><td>{{.}}</td></tr>
{{end}}</table>
<p>Click on one of the links below to auto generate a request to the backend as a real user or a tester</p>
<p><a href="/productpage?u=normal">Normal user</a></p>
<p><a href="/productpage?u=test">Test user</a></p>
</body>
</html>
`))

var productpageHTML = template.Must(template.New("productpage").Funcs(template.FuncMap{
	"stars": func(n int) []struct{} { return make([]struct{}, max(0, min(n, 5))) },
	"empty": func(n int) []struct{} { return make([]struct{}, 5-max(0, min(n, 5))) },
}).Parse(`<!DOCTYPE html>
<html>
<head><meta charset="utf-8"><title>Simple Bookstore App</title></head>
<body>
<h1>{{.Product.Title}}</h1>
<p>{{.Product.DescriptionHTML}}</p>
{{if eq .DetailsStatus 200}}<h4>Book Details</h4>
<table>
<tr><th>ISBN-10</th><th>Publisher</th><th>Pages</th><th>Type</th><th>Language</th></tr>
<tr><td>{{.Details.ISBN10}}</td><td>{{.Details.Publisher}}</td><td>{{.Details.Pages}}</td><td>{{.Details.Type}}</td><td>{{.Details.Language}}</td></tr>
</table>
{{else}}<h4>Error fetching product details</h4>
<p>{{.Details.Error}}</p>
{{end}}{{if eq .ReviewsStatus 200}}<h4>Book Reviews</h4>
{{range .Reviews.Reviews}}<blockquote>
<p>{{.Text}}</p>
<small>{{.Reviewer}}</small>
{{with .Rating}}{{if .Stars}}<font color="{{.Color}}">{{range stars .Stars}}<span class="glyphicon glyphicon-star"></span>{{end}}{{range empty .Stars}}<span class="glyphicon glyphicon-star-empty"></span>{{end}}</font>
{{else if .Error}}<p><i>{{.Error}}</i></p>
{{end}}{{end}}<dl><dt>Reviews served by:</dt>
<dd>
{{$.Reviews.Podname}}
{{if ne $.Reviews.Clustername "null"}}on cluster {{$.Reviews.Clustername}}
{{end}}</dd></dl>
</blockquote>
{{end}}{{else}}<h4>Error fetching product reviews</h4>
<p>{{.Reviews.Error}}</p>
{{end}}</body>
</html>
`))
