package main

import (
	"fmt"
	"strings"
)

// optSpec is one option of a getopt_long table.
type optSpec struct {
	long  string
	short byte // 0: long only
	arg   bool // takes a required argument
}

// getoptError is a command-line error worded as glibc's getopt_long words
// it (runtimes match on the text, e.g. "unrecognized option '--x").
type getoptError struct{ msg string }

func (e *getoptError) Error() string { return e.msg }

func getoptErr(format string, a ...any) error { return &getoptError{fmt.Sprintf(format, a...)} }

// getoptLong walks args as glibc's getopt_long does with a "+" optstring:
// options in order, "--x=y" and "--x y", unique prefixes of long names,
// bundled short options ("-46", "-tnone"), and it stops at the first
// non-option or after "--". It calls fn for every option; fn returning
// stop ends the walk there (as --version exits when it is reached). rest
// are the arguments after the options.
func getoptLong(args []string, specs []optSpec, fn func(o *optSpec, val string) (stop bool, err error)) (rest []string, stopped bool, err error) {
	i := 0
	next := func() (string, bool) {
		if i >= len(args) {
			return "", false
		}
		v := args[i]
		i++
		return v, true
	}
	for i < len(args) {
		a := args[i]
		if a == "--" {
			return args[i+1:], false, nil
		}
		if len(a) < 2 || a[0] != '-' {
			return args[i:], false, nil
		}
		i++
		if strings.HasPrefix(a, "--") {
			name, val, hasVal := strings.Cut(a[2:], "=")
			o, err := lookupLong(specs, name, a)
			if err != nil {
				return nil, false, err
			}
			switch {
			case hasVal && !o.arg:
				return nil, false, getoptErr("option '--%s' doesn't allow an argument", o.long)
			case !hasVal && o.arg:
				v, ok := next()
				if !ok {
					return nil, false, getoptErr("option '--%s' requires an argument", o.long)
				}
				val = v
			}
			stop, err := fn(o, val)
			if err != nil || stop {
				return nil, stop, err
			}
			continue
		}
		for j := 1; j < len(a); j++ {
			o := lookupShort(specs, a[j])
			if o == nil {
				return nil, false, getoptErr("invalid option -- '%c'", a[j])
			}
			val := ""
			if o.arg {
				if j+1 < len(a) {
					val = a[j+1:]
				} else if v, ok := next(); ok {
					val = v
				} else {
					return nil, false, getoptErr("option requires an argument -- '%c'", a[j])
				}
				j = len(a)
			}
			stop, err := fn(o, val)
			if err != nil || stop {
				return nil, stop, err
			}
		}
	}
	return nil, false, nil
}

func lookupLong(specs []optSpec, name, arg string) (*optSpec, error) {
	var matches []*optSpec
	for k := range specs {
		o := &specs[k]
		if o.long == name {
			return o, nil
		}
		if name != "" && strings.HasPrefix(o.long, name) {
			matches = append(matches, o)
		}
	}
	switch len(matches) {
	case 0:
		return nil, getoptErr("unrecognized option '%s'", arg)
	case 1:
		return matches[0], nil
	}
	names := make([]string, len(matches))
	for k, o := range matches {
		names[k] = "'--" + o.long + "'"
	}
	return nil, getoptErr("option '%s' is ambiguous; possibilities: %s", strings.SplitN(arg, "=", 2)[0], strings.Join(names, " "))
}

func lookupShort(specs []optSpec, c byte) *optSpec {
	for k := range specs {
		if specs[k].short == c {
			return &specs[k]
		}
	}
	return nil
}
