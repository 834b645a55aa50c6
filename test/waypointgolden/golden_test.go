package waypointgolden

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestRoundTrip: reading a golden and rendering it again gives its bytes,
// so Write and Read agree and no field is lost on the way (a type not
// linked in, a field our protos lack).
func TestRoundTrip(t *testing.T) {
	versions, err := Versions()
	if err != nil || len(versions) == 0 {
		t.Fatalf("no goldens: %v", err)
	}
	for _, v := range versions {
		scenarios, err := Scenarios(v)
		if err != nil {
			t.Fatal(err)
		}
		for _, sc := range scenarios {
			dir := filepath.Join(Dir(), v, sc)
			s, err := Read(dir)
			if err != nil {
				t.Fatal(err)
			}
			if err := Normalize(s); err != nil {
				t.Fatal(err)
			}
			files, err := Render(s)
			if err != nil {
				t.Fatal(err)
			}
			for name, b := range files {
				want, err := os.ReadFile(filepath.Join(dir, name))
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(b, want) {
					t.Errorf("%s/%s/%s changes when read and rendered again", v, sc, name)
				}
			}
		}
	}
}
