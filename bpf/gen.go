package bpf

// The include path names the multiarch directory of Debian's linux-libc-dev
// (asm/types.h); generation is done on amd64 and the output is committed.
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel -type ip_key -type pod_info -type iface_info -type reason -type listener_slot -type pod_flags -type iface_flags capture capture.c
