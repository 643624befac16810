package tap

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Offload flags for TUNSETOFFLOAD (linux/if_tun.h); x/sys/unix does not
// define them.
const (
	tunFCsum = 0x01
	tunFTSO4 = 0x02
	tunFTSO6 = 0x04
)

// errNoOffload marks a TAP that could not be set up with offloads (an old
// kernel, or a /dev/net/tun emulated by a sandbox): Create then falls back
// to a plain TAP.
var errNoOffload = errors.New("tap offloads unavailable")

// VnetHdrSize is the size of the virtio-net header (struct virtio_net_hdr)
// in front of every frame on a TAP opened with Options.Offload.
const VnetHdrSize = 10

// openOffloadQueue opens one queue with IFF_VNET_HDR and turns on checksum
// and TCP segmentation offload. songgao/water cannot ask for IFF_VNET_HDR
// (its flags are fixed), and the flag can only be given when the queue is
// attached, so this path talks to /dev/net/tun through x/sys/unix.
//
// With the offloads on, the guest's kernel hands over TCP segments of up to
// 64 KiB with the checksum left to us, whatever the MTU, and accepts such
// segments back: a TAP at MTU 1500 then costs one read per 64 KiB instead of
// one per 1.5 KiB.
func openOffloadQueue(name string, multiQueue bool) (*os.File, string, error) {
	fd, err := unix.Open(tunPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, "", explainOpenError(name, &os.PathError{Op: "open", Path: tunPath, Err: err})
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, "", fmt.Errorf("open tap %q: %w", name, err)
	}
	flags := uint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if multiQueue {
		flags |= unix.IFF_MULTI_QUEUE
	}
	ifr.SetUint16(flags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, "", fmt.Errorf("open tap %q: TUNSETIFF with IFF_VNET_HDR: %w: %w", name, errNoOffload, err)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, tunFCsum|tunFTSO4|tunFTSO6); err != nil {
		unix.Close(fd)
		return nil, "", fmt.Errorf("open tap %q: TUNSETOFFLOAD: %w: %w", name, errNoOffload, err)
	}
	return os.NewFile(uintptr(fd), tunPath), ifr.Name(), nil
}

// VnetHdrLen reports the size of the virtio-net header the kernel puts in
// front of each frame read from f (and expects in front of each frame
// written), or 0 when f is not a TAP queue opened with IFF_VNET_HDR. The
// process that receives a queue over a socket learns it this way instead of
// trusting the sender.
func VnetHdrLen(f *os.File) int {
	ifr, err := unix.NewIfreq("")
	if err != nil {
		return 0
	}
	if err := unix.IoctlIfreq(int(f.Fd()), unix.TUNGETIFF, ifr); err != nil {
		return 0
	}
	if ifr.Uint16()&unix.IFF_VNET_HDR == 0 {
		return 0
	}
	n, err := unix.IoctlGetInt(int(f.Fd()), unix.TUNGETVNETHDRSZ)
	if err != nil {
		return 0
	}
	return n
}
