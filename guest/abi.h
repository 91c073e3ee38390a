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
/* Largest RAM the kernel boots with: its reserved area (a 4 KiB PT per 2 MiB of RAM, 4 bitmap bits
 * per page) grows by about 2.1 MiB per GiB of RAM and must end below ABI_KERNEL_MAX_ADDR. */
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

/* Phase kinds and flags. */
#define PHASE_ALLOC 1
#define PHASE_FREE 2
#define PHASE_TOUCH 3
#define PHASE_IDLE 4
#define PHASE_FAULT 5
#define PHASE_F_WRITE 1u
#define PHASE_F_RANDOM 2u
#define PHASE_F_VERIFY 4u /* check each access: the page holds what the app wrote (page index + 1) */

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
_Static_assert(sizeof(struct msg) == ABI_MSG_SIZE, "message size");
_Static_assert(__builtin_offsetof(struct msg, reply) == 0x60, "reply offset");
_Static_assert(__builtin_offsetof(struct msg, tsc) == 0x68, "tsc offset");
#endif

#endif
