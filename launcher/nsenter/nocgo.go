//go:build !cgo

package nsenter

// The namespace joins happen in a C constructor (nsenter.c), which only cgo
// builds. Without cgo this package would silently be empty and the helpers
// would fail at run time; this makes the build fail instead, with the fix as
// the error message. (Go turns cgo off by itself when it finds no C
// compiler.)
var _ = cgo_is_required_install_a_C_compiler_such_as_gcc_and_build_with_CGO_ENABLED_1
