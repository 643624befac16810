// Package cli holds what both binaries' command lines share.
package cli

import (
	"io"
	"log/slog"
)

// NewLogger logs to w in text or json, quiet (warnings only) unless debug.
func NewLogger(w io.Writer, debug bool, format string) *slog.Logger {
	opts := &slog.HandlerOptions{Level: slog.LevelWarn}
	if debug {
		opts.Level = slog.LevelDebug
	}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
