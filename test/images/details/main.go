// Command details is Bookinfo's details service
// (samples/bookinfo/src/details/details.rb in istio.io/istio) as a static
// Go program: GET /details/ID answers the book's details as JSON, GET
// /health that it is healthy. Like the original without
// ENABLE_EXTERNAL_BOOK_SERVICE, it makes no request of its own.
package main

import (
	"net/http"

	"github.com/amber-mesh/amber/test/images/bookinfo"
)

func main() {
	bookinfo.ServeBackend("details", func(w http.ResponseWriter, _ *http.Request, id int) {
		bookinfo.WriteJSON(w, http.StatusOK, map[string]any{
			"id": id, "author": "William Shakespeare", "year": 1595, "type": "paperback", "pages": 200,
			"publisher": "PublisherA", "language": "English", "ISBN-10": "1234567890", "ISBN-13": "123-1234567890",
		})
	})
}
