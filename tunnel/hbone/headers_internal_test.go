package hbone

import (
	"bytes"
	"net/http"
	"testing"

	"golang.org/x/net/http2/hpack"
)

func TestRequestFieldsNeverIndexTraceparent(t *testing.T) {
	hdr := http.Header{}
	hdr.Set("Traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
	hdr.Set("Baggage", "k8s.namespace.name=default")
	fields, _, err := requestFields("10.0.0.1:80", hdr)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	enc := hpack.NewEncoder(&buf)
	for _, f := range fields {
		if err := enc.WriteField(f); err != nil {
			t.Fatal(err)
		}
	}
	decoded, err := hpack.NewDecoder(4096, nil).DecodeFull(buf.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	seen := 0
	for _, f := range decoded {
		switch f.Name {
		case "traceparent":
			seen++
			if !f.Sensitive {
				t.Error("traceparent is indexed: every stream would churn both HPACK tables")
			}
		case "baggage":
			seen++
			if f.Sensitive {
				t.Error("baggage repeats per workload and should be indexed")
			}
		}
	}
	if seen != 2 {
		t.Fatalf("decoded %v", decoded)
	}
}
