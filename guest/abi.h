/* The memvisor guest ABI: the one definition of every constant and structure the VMM and the
 * guest share. The VMM takes them from here too (build.rs compiles guest/abi_dump.c, which prints
 * them as Rust for src/abi.rs), so nothing can drift; docs/abi.md explains them. Usable from C and
 * from GNU assembler (the C parts are guarded). */
#ifndef MEMVISOR_ABI_H
#define MEMVISOR_ABI_H

/* Guest-physical layout. */
#define ABI_PAGE_SIZE 4096
#define ABI_GDT_ADDR 0x1000
#define ABI_GDT_ENTRIES 8
#define ABI_TSS_ADDR 0x1800
#define ABI_TSS_SIZE 0x68 /* 64-bit TSS: limit ABI_TSS_SIZE - 1 */
#define ABI_TSS_RSP0_ADDR 0x1804
#define ABI_BOOT_INFO_ADDR 0x2000
#define ABI_PML4_ADDR 0x3000
#define ABI_PDPT_ADDR 0x4000
#define ABI_PD0_ADDR 0x5000
#define ABI_KERNEL_BASE 0x100000
#define ABI_KERNEL_MAX_ADDR 0x40000000 /* end of the VMM's identity map */
/* Largest RAM the kernel boots with: its reserved area (a 4 KiB PT per 2 MiB of RAM, 6 bitmap bits
 * per page) grows by about 2.2 MiB per GiB of RAM and must end below ABI_KERNEL_MAX_ADDR. */
#define ABI_MAX_MEM_BYTES (448ULL << 30)

/* GDT selectors. */
#define ABI_SEL_KCODE 0x08
#define ABI_SEL_KDATA 0x10
#define ABI_SEL_UCODE32 0x18
#define ABI_SEL_UDATA 0x23
#define ABI_SEL_UCODE 0x2b
#define ABI_SEL_TSS 0x30

/* Ports. */
#define ABI_COM1 0x3f8
#define ABI_REPORT_PORT 0x510

/* Boot info. */
#define ABI_BOOT_MAGIC 0x31304f4f42564dULL
#define ABI_MAX_PHASES 32
#define ABI_MAX_SPEC_TEXT 1024
#define ABI_MAX_CMDLINE 256 /* the kernel command line: "virtio_mmio.device=4K@0x7000000000:0" */

/* The virtio-balloon device, virtio-mmio with version 2 (virtio 1.x) registers. It sits just above
 * the largest RAM the built-in guest boots with, so it is never inside guest RAM; the kernel finds
 * it from the command line in the boot info (as Linux would) and maps it at ABI_BALLOON_MMIO_VA.
 * There is no interrupt: the driver polls, and the VMM handles each notification (a write to
 * QUEUE_NOTIFY) on the vCPU thread before the guest runs again. */
#define ABI_BALLOON_MMIO_BASE ABI_MAX_MEM_BYTES
#define ABI_BALLOON_MMIO_SIZE 0x1000
#define ABI_BALLOON_MMIO_VA (511ULL << 30) /* kernel-only, PDPT entry 511 */
#define ABI_BALLOON_QUEUE_MAX 256           /* QueueNumMax of every queue */
#define ABI_BALLOON_MAX_PFNS 4096           /* PFNs per inflate/deflate descriptor, at most */

/* virtio-mmio registers (virtio 1.2, 4.2.2); src/abi.rs checks them against virtio-bindings. */
#define VIRTIO_MMIO_MAGIC 0x74726976 /* "virt" */
#define VIRTIO_MMIO_MAGIC_VALUE 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_VENDOR_ID 0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_AVAIL_LOW 0x090
#define VIRTIO_MMIO_QUEUE_AVAIL_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_USED_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_USED_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100
#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 64
#define VIRTIO_STATUS_FAILED 128
#define VIRTIO_F_VERSION_1 32
#define VIRTIO_ID_BALLOON 5
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2

/* virtio-balloon (virtio 1.2, 5.5). Queues are numbered in order among those the features bring:
 * inflate 0, deflate 1, stats 2 (with STATS_VQ), then reporting (with REPORTING): 3, or 2 without
 * STATS_VQ (free page hinting is not offered). */
#define VIRTIO_BALLOON_F_STATS_VQ 1
#define VIRTIO_BALLOON_F_DEFLATE_ON_OOM 2
#define VIRTIO_BALLOON_F_REPORTING 5
#define VIRTIO_BALLOON_CFG_NUM_PAGES 0x0 /* le32, config space: the device's target */
#define VIRTIO_BALLOON_CFG_ACTUAL 0x4    /* le32, config space: pages in the balloon (driver) */
#define VIRTIO_BALLOON_S_MEMFREE 4
#define VIRTIO_BALLOON_S_MEMTOT 5
#define VIRTIO_BALLOON_S_AVAIL 6
#define VIRTIO_BALLOON_STAT_SIZE 10 /* le16 tag, le64 value, packed */

/* Phase kinds and flags. */
#define PHASE_ALLOC 1
#define PHASE_FREE 2
#define PHASE_TOUCH 3
#define PHASE_IDLE 4
#define PHASE_FAULT 5
#define PHASE_CHECK 6
#define PHASE_F_WRITE 1u
#define PHASE_F_RANDOM 2u
#define PHASE_F_MIXED 8u  /* reads and writes in turn, access by access */
#define PHASE_F_VERIFY 4u /* check each access: the page holds what the app wrote (page index + 1) */
/* What a write puts in a page (without either flag: its index + 1, unique). The app only ever writes
 * a page's first word and the rest of every heap page stays zero, so the word is the whole content. */
#define PHASE_F_FILL_SAME 16u /* every page the same word, from the seed: identical pages */
#define PHASE_F_FILL_ZERO 32u /* the word 0: the whole page reads zero */

/* Messages. */
#define ABI_MSG_MAGIC 0x3152564du
#define ABI_MSG_SIZE 128
#define MSG_BOOT 1
#define MSG_PHASE_START 2
#define MSG_PHASE_END 3
#define MSG_INTERVAL 4
#define MSG_SLEEP 5
#define MSG_TIME 6
#define MSG_DONE 7
#define MSG_FAULT 8

/* PHASE_END status (arg1). */
#define PHASE_OK 0
#define PHASE_OOM 1
#define PHASE_BAD 2
#define PHASE_CORRUPT 3 /* verify: arg2 = accesses that found other contents */

/* FAULT arg0 values >= this are kernel boot errors, not CPU exceptions. */
#define FAULT_BOOT_ERROR 0x100
#define BOOT_ERR_MAGIC (FAULT_BOOT_ERROR + 1)     /* boot info magic wrong */
#define BOOT_ERR_APP (FAULT_BOOT_ERROR + 2)       /* embedded app header bad */
#define BOOT_ERR_NO_MEMORY (FAULT_BOOT_ERROR + 3) /* reserved area does not fit below 1 GiB / RAM */
#define BOOT_ERR_TOO_LARGE (FAULT_BOOT_ERROR + 4) /* RAM above ABI_MAX_MEM_BYTES */

/* System calls: `int3` from ring 3 (IDT gate 3 has DPL 3). On this host's KVM (PVM) SYSCALL does
 * not switch to ring 0 and `int $n` for n other than 3 raises #UD. */
#define SYSCALL_VECTOR 3
#define SYS_REPORT 0
#define SYS_ALLOC 1
#define SYS_FREE 2
#define SYS_SLEEP 3
#define SYS_EXIT 4

/* Guest-virtual layout of the app. */
#define APP_BASE 0x40000000ULL
#define APP_BOOT_INFO_VA 0x50000000ULL
#define APP_BITMAP_VA 0x60000000ULL
#define APP_UNMAPPED_VA 0x70000000ULL /* never mapped: the fault phase touches it */
#define APP_HEAP_VA 0x80000000ULL
#define APP_MAGIC 0x5050414d56ULL
#define APP_STACK_SIZE 65536

#ifndef __ASSEMBLER__
typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

struct phase {
    u32 kind;
    u32 flags;
    u64 pages;
    u64 duration_ns;
    u64 hot_pages;
    u64 hot_permille;
    u64 reserved[3];
};

struct boot_info {
    u64 magic;
    u64 mem_bytes;
    u64 tsc_khz;
    u64 interval; /* bumped by the VMM at every interval tick: read it volatile */
    u64 nphases;
    u64 flags;
    u64 seed;
    u64 spec_len;
    struct phase phases[ABI_MAX_PHASES];
    char spec[ABI_MAX_SPEC_TEXT];
    u64 cmdline_len;
    char cmdline[ABI_MAX_CMDLINE]; /* not NUL-terminated; empty: no devices */
};

struct msg {
    u32 magic;
    u32 kind;
    u64 phase;
    u64 interval;
    u64 touched;
    u64 written;
    u64 iterations;
    u64 alloc_pages; /* filled by the kernel */
    u64 free_pages;  /* filled by the kernel */
    u64 heap_pages;
    u64 arg0;
    u64 arg1;
    u64 arg2;
    u64 reply; /* written by the VMM */
    u64 tsc;
    u64 cr2; /* FAULT: CR2 at the exception */
    u64 cs;  /* FAULT: CS at the exception */
};

struct app_header {
    u64 magic;
    u64 entry;
    u64 file_end; /* virtual, page aligned */
    u64 bss_end;  /* virtual, page aligned */
};

_Static_assert(sizeof(struct phase) == 64, "phase entry size");
_Static_assert(__builtin_offsetof(struct boot_info, phases) == 0x40, "phase table offset");
_Static_assert(__builtin_offsetof(struct boot_info, spec) == 0x840, "spec offset");
_Static_assert(sizeof(struct boot_info) <= ABI_PAGE_SIZE, "boot info fits its page");
_Static_assert(sizeof(struct msg) == ABI_MSG_SIZE, "message size");
_Static_assert(__builtin_offsetof(struct msg, reply) == 0x60, "reply offset");
_Static_assert(__builtin_offsetof(struct msg, tsc) == 0x68, "tsc offset");
#endif

#endif
