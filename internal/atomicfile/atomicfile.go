// Package atomicfile replaces a file so that a reader sees either the old
// content or the new, never a partial write: a new inode is written, synced
// and renamed into place (a process executing the old file keeps it).
package atomicfile

import (
	"os"
	"path/filepath"
)

// Write replaces path with data (mode perm), creating its directory with
// dirPerm when missing.
func Write(path string, data []byte, perm, dirPerm os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(path), dirPerm); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}
