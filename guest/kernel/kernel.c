/* memvisor guest kernel (ring 0).
 *
 * Ring 0 runs through the host's instruction emulator (about 1.3 us per instruction), so this
 * kernel does as little as possible: it maps the app, keeps the pool's free and allocated lists as
 * extent lists (never touching pool pages), maps and unmaps the heap, forwards messages, and
 * drives a virtio-balloon by polling (free page reporting after a free, statistics once per
 * interval, inflate/deflate to the device's target). See docs/abi.md. */
#include "../abi.h"

#define PTE_P 0x1ULL
#define PTE_RW 0x2ULL
#define PTE_U 0x4ULL
#define PTE_PWT 0x8ULL
#define PTE_PCD 0x10ULL
#define PTE_PS 0x80ULL
#define PTE_USER (PTE_P | PTE_RW | PTE_U)
#define PDE_2M_ADDR 0x000fffffffe00000ULL


/* PD1 (virtual 1..2 GiB) slots of the app's regions. */
#define PD1_APP 0                                      /* 0x4000_0000 */
#define PD1_BOOT_INFO ((APP_BOOT_INFO_VA - APP_BASE) >> 21) /* 0x5000_0000 */
#define PD1_BITMAPS ((APP_BITMAP_VA - APP_BASE) >> 21)     /* 0x6000_0000 */
#define PD1_UNMAPPED ((APP_UNMAPPED_VA - APP_BASE) >> 21)
#define PDPT_HEAP (APP_HEAP_VA >> 30)                       /* 2 */

/* Extent lists: runs of pool page frames, {first pfn, pages}. The free list is sorted by address;
 * the allocated list is in heap order (its last extent backs the heap top). */
#define MAX_EXTENTS 64
struct extent {
    u64 start;
    u64 n;
};

typedef unsigned short u16;

extern char __kernel_end[];
extern char app_blob[], app_blob_end[];
extern char kstack_top[];
extern char idt_desc[];
extern void enter_user(u64 rdi, u64 rsi, u64 entry, u64 rsp) __attribute__((noreturn));

static volatile struct boot_info *const bi = (volatile struct boot_info *)ABI_BOOT_INFO_ADDR;
static volatile struct msg kmsg __attribute__((aligned(128)));

static struct extent free_ext[MAX_EXTENTS];
static struct extent alloc_ext[MAX_EXTENTS];
static u64 nfree_ext, nalloc_ext;
static u64 free_pages, alloc_pages; /* alloc_pages is also the heap top, in pages */

static u64 *heap_pd; /* the heap's PDs, one array indexed by 2 MiB region */
static u64 *heap_pt; /* the heap's PTs, one array indexed by heap page (PT r backs region r) */
static u64 app_file_end, app_end; /* virtual */
static u64 app_bss_pa;

/* The virtio-balloon driver's state. Queues live in kernel .bss (identity mapped: virtual =
 * physical). One descriptor per buffer; the device handles a notification before the guest runs
 * again, so a buffer's used entry is there when the notifying write returns. */
#define BQ 8              /* entries per queue */
#define BAL_PFNS 1024     /* PFNs per inflate/deflate buffer (<= ABI_BALLOON_MAX_PFNS) */
#define REPORT_MAX (1ULL << 18) /* pages per reported range: 1 GiB, so its length fits a u32 */
struct vdesc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};
struct vq {
    struct vdesc desc[BQ];
    struct {
        u16 flags, idx, ring[BQ], used_event;
    } avail;
    struct {
        u16 flags, idx;
        struct {
            u32 id, len;
        } ring[BQ];
        u16 avail_event;
    } used __attribute__((aligned(4)));
    u16 seen; /* used entries consumed */
} __attribute__((aligned(16))); /* the descriptor table's alignment */
struct bstat {
    u16 tag;
    u64 val;
} __attribute__((packed));
static struct vq vqs[4];
static u64 mmio_pd[512] __attribute__((aligned(4096)));
static volatile u32 *bm; /* the device's registers; 0: no (working) balloon */
static int q_stats = -1, q_report = -1, bal_oom;
static struct bstat bstats[3];
static u32 bal_pfns[BAL_PFNS];
static struct extent bal_ext[MAX_EXTENTS]; /* pages in the balloon */
static struct extent rep_ext[MAX_EXTENTS]; /* free pages reported and not handed out since */
static u64 nbal_ext, nrep_ext, bal_pages;

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static inline void outb(u32 port, u8 v)
{
    __asm__ volatile("outb %0, %w1" : : "a"(v), "Nd"(port));
}

/* Sends the message at guest-physical `pa` (the VMM handles the OUT synchronously). */
static inline void report(u64 pa)
{
    __asm__ volatile("outl %0, %w1" : : "a"((u32)pa), "Nd"(ABI_REPORT_PORT) : "memory");
}

static inline void reload_cr3(void)
{
    u64 t;
    __asm__ volatile("mov %%cr3, %0\n\tmov %0, %%cr3" : "=r"(t) : : "memory");
}

static __attribute__((noreturn)) void halt(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* Sends a kernel message; fields the kernel never uses stay zero. */
static void ksend(u32 kind, u64 a0, u64 a1, u64 a2)
{
    kmsg.kind = kind;
    kmsg.alloc_pages = alloc_pages;
    kmsg.free_pages = free_pages;
    kmsg.heap_pages = alloc_pages;
    kmsg.arg0 = a0;
    kmsg.arg1 = a1;
    kmsg.arg2 = a2;
    kmsg.reply = 0;
    kmsg.tsc = rdtsc();
    report((u64)&kmsg);
}

/* Called by the exception stubs: report and stop. */
__attribute__((noreturn, used)) void kfault(u64 vec, u64 err, u64 rip, u64 cr2, u64 cs)
{
    kmsg.cr2 = cr2;
    kmsg.cs = cs;
    ksend(MSG_FAULT, vec, err, rip);
    halt();
}

static __attribute__((noreturn)) void boot_fail(u64 code, u64 detail)
{
    kmsg.magic = ABI_MSG_MAGIC;
    ksend(MSG_FAULT, code, detail, 0);
    halt();
}

/* Maps heap pages [vp, vp + n) to frames [pfn, pfn + n): 2 MiB PDEs where virtual and physical
 * are both 2 MiB aligned and a whole 2 MiB remains, else 4 KiB PTEs. Only non-present entries
 * become present here, so no TLB flush is needed. */
static void map(u64 vp, u64 pfn, u64 n)
{
    while (n) {
        if (((vp | pfn) & 511) == 0 && n >= 512) {
            u64 m = n >> 9;
            u64 *pd = &heap_pd[vp >> 9];
            u64 v = (pfn << 12) | PTE_USER | PTE_PS;
            vp += m << 9;
            pfn += m << 9;
            n -= m << 9;
#pragma GCC unroll 4
            do {
                *pd++ = v;
                v += 512 * ABI_PAGE_SIZE;
            } while (--m);
            continue;
        }
        u64 k = 512 - (vp & 511);
        if (k > n)
            k = n;
        if ((vp & 511) == 0) /* a region's PDE is present exactly while the heap reaches into it */
            heap_pd[vp >> 9] = (u64)&heap_pt[vp] | PTE_USER;
        u64 *pte = &heap_pt[vp];
        u64 v = (pfn << 12) | PTE_USER;
        vp += k;
        pfn += k;
        n -= k;
#pragma GCC unroll 8
        do {
            *pte++ = v;
            v += ABI_PAGE_SIZE;
        } while (--k);
    }
}

/* Unmaps heap pages [vp, end), end being the heap top: PTEs of unmapped pages are cleared, and a
 * region's PDE is cleared when the region empties. The caller reloads CR3. */
static void unmap(u64 vp, u64 end)
{
    while (vp < end) {
        u64 *pd = &heap_pd[vp >> 9];
        if ((vp & 511) == 0 && end - vp >= 512 && (*pd & PTE_PS)) {
            /* A run of whole 2 MiB pages. */
            u64 m = (end - vp) >> 9;
            do {
                *pd++ = 0;
                vp += 512;
            } while (--m && (*pd & PTE_PS));
            continue;
        }
        u64 rbase = vp & ~511ULL;
        u64 rend = rbase + 512 < end ? rbase + 512 : end;
        if (*pd & PTE_PS) {
            /* Split: the low vp - rbase pages of this 2 MiB page stay mapped, by PT. */
            u64 *pte = &heap_pt[rbase];
            u64 v = (*pd & PDE_2M_ADDR) | PTE_USER;
            u64 keep = vp - rbase;
#pragma GCC unroll 8
            do {
                *pte++ = v;
                v += ABI_PAGE_SIZE;
            } while (--keep);
            *pd = (u64)&heap_pt[rbase] | PTE_USER;
        } else {
            u64 *pte = &heap_pt[vp];
            u64 k = rend - vp;
#pragma GCC unroll 8
            do {
                *pte++ = 0;
            } while (--k);
            if (vp == rbase)
                *pd = 0;
        }
        vp = rend;
    }
}

/* Adds frames [start, start + n) (not on the list) to a sorted extent list, merging with
 * neighbours. The caller makes sure there is room for one more extent. */
static void ext_insert(struct extent *l, u64 *cnt, u64 start, u64 n)
{
    u64 i = 0, c = *cnt;
    while (i < c && l[i].start < start)
        i++;
    int prev = i > 0 && l[i - 1].start + l[i - 1].n == start;
    int next = i < c && start + n == l[i].start;
    if (prev && next) {
        l[i - 1].n += n + l[i].n;
        for (u64 j = i + 1; j < c; j++)
            l[j - 1] = l[j];
        c--;
    } else if (prev) {
        l[i - 1].n += n;
    } else if (next) {
        l[i].start = start;
        l[i].n += n;
    } else {
        for (u64 j = c; j > i; j--)
            l[j] = l[j - 1];
        l[i].start = start;
        l[i].n = n;
        c++;
    }
    *cnt = c;
}

/* Removes frames [s, s + n) from a sorted extent list. An extent that would split when the list
 * is full is dropped whole (the lists it is used for only ever under-count). */
static void ext_remove(struct extent *l, u64 *cnt, u64 s, u64 n)
{
    u64 e = s + n;
    for (u64 i = 0; i < *cnt; i++) {
        u64 a = l[i].start, b = a + l[i].n;
        if (b <= s || a >= e)
            continue;
        if (a < s && b > e && *cnt < MAX_EXTENTS - 1) {
            for (u64 j = *cnt; j > i + 1; j--)
                l[j] = l[j - 1];
            l[i + 1].start = e;
            l[i + 1].n = b - e;
            (*cnt)++;
            l[i].n = s - a;
            return;
        }
        if (a < s && b <= e) {
            l[i].n = s - a;
        } else if (a >= s && b > e) {
            l[i].start = e;
            l[i].n = b - e;
        } else {
            for (u64 j = i + 1; j < *cnt; j++)
                l[j - 1] = l[j];
            (*cnt)--;
            i--;
        }
    }
}

/* Returns frames [start, start + n) to the free list, merging with neighbours. */
static void free_insert(u64 start, u64 n)
{
    ext_insert(free_ext, &nfree_ext, start, n);
}

static inline u32 bal_rd(u32 off)
{
    return bm[off / 4];
}

static inline void bal_wr(u32 off, u32 v)
{
    bm[off / 4] = v;
}

/* Stops using the device (it did not answer, or it is in its error state). */
static void balloon_off(void)
{
    bm = 0;
}

/* Queues one buffer on queue q and notifies the device. */
static void vq_send(int q, u64 addr, u32 len, u16 flags)
{
    struct vq *v = &vqs[q];
    u16 slot = v->avail.idx % BQ;
    v->desc[slot].addr = addr;
    v->desc[slot].len = len;
    v->desc[slot].flags = flags;
    v->desc[slot].next = 0;
    v->avail.ring[slot] = slot;
    __asm__ volatile("" : : : "memory");
    v->avail.idx++;
    __asm__ volatile("" : : : "memory");
    bal_wr(VIRTIO_MMIO_QUEUE_NOTIFY, (u32)q);
}

/* Consumes one used entry of queue q, if there is one. */
static int vq_used(int q)
{
    struct vq *v = &vqs[q];
    if (*(volatile u16 *)&v->used.idx == v->seen)
        return 0;
    v->seen++;
    return 1;
}

/* Sends a buffer the device must acknowledge at once; on silence the balloon is turned off. */
static int vq_call(int q, u64 addr, u32 len, u16 flags)
{
    vq_send(q, addr, len, flags);
    if (vq_used(q))
        return 1;
    balloon_off();
    return 0;
}

/* Sends on queue q the PFNs of up to n pages (at most BAL_PFNS) from the top of the last extent
 * of list (cnt extents), and takes them out of it; returns how many, 0 when the device refused. */
static u64 send_top(int q, struct extent *list, u64 *cnt, u64 n, u64 *start)
{
    struct extent *e = &list[*cnt - 1];
    u64 k = n < e->n ? n : e->n;
    if (k > BAL_PFNS)
        k = BAL_PFNS;
    *start = e->start + e->n - k;
    for (u64 i = 0; i < k; i++)
        bal_pfns[i] = (u32)(*start + i);
    if (!vq_call(q, (u64)bal_pfns, (u32)(k * 4), 0))
        return 0;
    e->n -= k;
    if (e->n == 0)
        (*cnt)--;
    return k;
}

/* Inflates by up to n pages, from the top of the highest free extent. */
static void inflate(u64 n)
{
    while (n && bm && nfree_ext && nbal_ext < MAX_EXTENTS - 1) {
        u64 start, k = send_top(0, free_ext, &nfree_ext, n, &start);
        if (!k)
            return;
        free_pages -= k;
        ext_insert(bal_ext, &nbal_ext, start, k);
        ext_remove(rep_ext, &nrep_ext, start, k);
        bal_pages += k;
        n -= k;
    }
}

/* Deflates by up to n pages, from the top of the highest balloon extent. */
static void deflate(u64 n)
{
    while (n && bm && nbal_ext && nfree_ext < MAX_EXTENTS - 1) {
        u64 start, k = send_top(1, bal_ext, &nbal_ext, n, &start);
        if (!k)
            return;
        bal_pages -= k;
        free_insert(start, k);
        free_pages += k;
        n -= k;
    }
}

/* Moves the balloon to the device's target (as far as free pages allow). */
static void balloon_adjust(void)
{
    if (!bm)
        return;
    u64 target = bal_rd(VIRTIO_MMIO_CONFIG + VIRTIO_BALLOON_CFG_NUM_PAGES);
    if (target > bal_pages)
        inflate(target - bal_pages);
    else if (target < bal_pages)
        deflate(bal_pages - target);
    if (bm)
        bal_wr(VIRTIO_MMIO_CONFIG + VIRTIO_BALLOON_CFG_ACTUAL, (u32)bal_pages);
}

/* Hands the device a fresh statistics buffer (it keeps it until it wants the next one). */
static void stats_send(void)
{
    bstats[0].tag = VIRTIO_BALLOON_S_MEMFREE;
    bstats[0].val = free_pages << 12;
    bstats[1].tag = VIRTIO_BALLOON_S_MEMTOT;
    bstats[1].val = (free_pages + alloc_pages) << 12;
    bstats[2].tag = VIRTIO_BALLOON_S_AVAIL;
    bstats[2].val = free_pages << 12;
    vq_send(q_stats, (u64)bstats, sizeof(bstats), 0);
}

/* Called on every system call: a few instructions unless the device asked for statistics
 * (once per interval), which is also when the target is looked at. */
static void balloon_poll(void)
{
    if (!bm || q_stats < 0 || !vq_used(q_stats))
        return;
    balloon_adjust();
    if (bm)
        stats_send();
}

/* Reports one free range to the device and waits for its acknowledgement. */
static int report_range(u64 s, u64 n)
{
    if (!vq_call(q_report, s << 12, (u32)(n << 12), VIRTQ_DESC_F_WRITE))
        return 0;
    if (nrep_ext < MAX_EXTENTS - 1)
        ext_insert(rep_ext, &nrep_ext, s, n);
    return 1;
}

/* Free page reporting: every 2 MiB-aligned run of at least 2 MiB of free pages not reported yet
 * is reported (as Linux does, in pageblock-sized and aligned pieces), after each free. */
static void report_free(void)
{
    for (u64 i = 0; i < nfree_ext && bm; i++) {
        u64 s = (free_ext[i].start + 511) & ~511ULL;
        u64 e = (free_ext[i].start + free_ext[i].n) & ~511ULL;
        while (s + 512 <= e && bm) {
            u64 j = 0;
            while (j < nrep_ext && rep_ext[j].start + rep_ext[j].n <= s)
                j++;
            int more = j < nrep_ext && rep_ext[j].start < e;
            u64 g = (more ? rep_ext[j].start : e) & ~511ULL; /* the gap is [s, g) */
            if (g > s + REPORT_MAX)
                g = s + REPORT_MAX;
            if (g >= s + 512) {
                if (!report_range(s, g - s))
                    return;
                s = g;
                continue;
            }
            if (!more)
                break;
            s = (rep_ext[j].start + rep_ext[j].n + 511) & ~511ULL;
        }
    }
}

/* The device's base from the command line ("virtio_mmio.device=4K@0x...:0"), or 0. */
static u64 balloon_base(void)
{
    static const char key[] = "virtio_mmio.device=";
    u64 n = bi->cmdline_len < ABI_MAX_CMDLINE ? bi->cmdline_len : ABI_MAX_CMDLINE;
    volatile const char *c = bi->cmdline;
    u64 i = 0;
    for (; key[i]; i++)
        if (i >= n || c[i] != key[i])
            return 0;
    while (i < n && c[i] != '@')
        i++;
    if (i + 2 >= n || c[i + 1] != '0' || c[i + 2] != 'x')
        return 0;
    u64 base = 0;
    for (i += 3; i < n && c[i] != ':'; i++) {
        char ch = c[i];
        u64 d = ch >= '0' && ch <= '9' ? (u64)(ch - '0') : ch >= 'a' && ch <= 'f' ? (u64)(ch - 'a' + 10) : 16;
        if (d > 15)
            return 0;
        base = base << 4 | d;
    }
    return base;
}

/* Finds, maps and starts the balloon (virtio 1.2, 3.1.1), then inflates to its target. */
static void balloon_init(void)
{
    u64 base = balloon_base();
    if (!base || (base & 0x1fffff))
        return;
    ((u64 *)ABI_PDPT_ADDR)[ABI_BALLOON_MMIO_VA >> 30] = (u64)mmio_pd | PTE_P | PTE_RW;
    mmio_pd[0] = base | PTE_P | PTE_RW | PTE_PS | PTE_PCD | PTE_PWT;
    bm = (volatile u32 *)ABI_BALLOON_MMIO_VA;
    if (bal_rd(VIRTIO_MMIO_MAGIC_VALUE) != VIRTIO_MMIO_MAGIC || bal_rd(VIRTIO_MMIO_VERSION) != 2 ||
        bal_rd(VIRTIO_MMIO_DEVICE_ID) != VIRTIO_ID_BALLOON) {
        balloon_off();
        return;
    }
    u32 st = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER;
    bal_wr(VIRTIO_MMIO_STATUS, 0);
    bal_wr(VIRTIO_MMIO_STATUS, st);
    bal_wr(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    u32 hi = bal_rd(VIRTIO_MMIO_DEVICE_FEATURES);
    bal_wr(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    u32 lo = bal_rd(VIRTIO_MMIO_DEVICE_FEATURES);
    lo &= (1u << VIRTIO_BALLOON_F_STATS_VQ) | (1u << VIRTIO_BALLOON_F_DEFLATE_ON_OOM) |
          (1u << VIRTIO_BALLOON_F_REPORTING);
    bal_wr(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    bal_wr(VIRTIO_MMIO_DRIVER_FEATURES, lo);
    bal_wr(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    bal_wr(VIRTIO_MMIO_DRIVER_FEATURES, 1u << (VIRTIO_F_VERSION_1 - 32));
    st |= VIRTIO_STATUS_FEATURES_OK;
    bal_wr(VIRTIO_MMIO_STATUS, st);
    if (!(hi & (1u << (VIRTIO_F_VERSION_1 - 32))) || !(bal_rd(VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK)) {
        bal_wr(VIRTIO_MMIO_STATUS, st | VIRTIO_STATUS_FAILED);
        balloon_off();
        return;
    }
    int nq = 2;
    if (lo & (1u << VIRTIO_BALLOON_F_STATS_VQ))
        q_stats = nq++;
    if (lo & (1u << VIRTIO_BALLOON_F_REPORTING))
        q_report = nq++;
    bal_oom = (lo >> VIRTIO_BALLOON_F_DEFLATE_ON_OOM) & 1;
    for (int q = 0; q < nq; q++) {
        bal_wr(VIRTIO_MMIO_QUEUE_SEL, (u32)q);
        if (bal_rd(VIRTIO_MMIO_QUEUE_NUM_MAX) < BQ) {
            bal_wr(VIRTIO_MMIO_STATUS, st | VIRTIO_STATUS_FAILED);
            balloon_off();
            return;
        }
        bal_wr(VIRTIO_MMIO_QUEUE_NUM, BQ);
        bal_wr(VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)(u64)vqs[q].desc);
        bal_wr(VIRTIO_MMIO_QUEUE_AVAIL_LOW, (u32)(u64)&vqs[q].avail);
        bal_wr(VIRTIO_MMIO_QUEUE_USED_LOW, (u32)(u64)&vqs[q].used);
        bal_wr(VIRTIO_MMIO_QUEUE_READY, 1);
    }
    bal_wr(VIRTIO_MMIO_STATUS, st | VIRTIO_STATUS_DRIVER_OK);
    balloon_adjust();
    if (bm && q_stats >= 0)
        stats_send();
}

static __attribute__((noinline)) u64 sys_alloc(u64 n)
{
    /* An allocation adds at most one allocated extent per free extent it consumes; a free adds at
     * most one free extent. Refusing when the lists could overflow keeps both bounded (with LIFO
     * frees and lowest-address-first allocation there is in fact one extent on each list). */
    if (n > free_pages && bal_oom)
        deflate(n - free_pages); /* VIRTIO_BALLOON_F_DEFLATE_ON_OOM */
    if (n == 0 || n > free_pages || nalloc_ext + nfree_ext >= MAX_EXTENTS - 1)
        return 0;
    u64 vp = alloc_pages;
    u64 va = APP_HEAP_VA + (vp << 12);
    u64 left = n;
    while (left) {
        struct extent *e = &free_ext[0];
        u64 take = e->n < left ? e->n : left;
        map(vp, e->start, take);
        if (nrep_ext)
            ext_remove(rep_ext, &nrep_ext, e->start, take); /* reported pages in use again */
        if (nalloc_ext && alloc_ext[nalloc_ext - 1].start + alloc_ext[nalloc_ext - 1].n == e->start) {
            alloc_ext[nalloc_ext - 1].n += take;
        } else {
            alloc_ext[nalloc_ext].start = e->start;
            alloc_ext[nalloc_ext].n = take;
            nalloc_ext++;
        }
        e->start += take;
        e->n -= take;
        if (e->n == 0) {
            for (u64 j = 1; j < nfree_ext; j++)
                free_ext[j - 1] = free_ext[j];
            nfree_ext--;
        }
        vp += take;
        left -= take;
    }
    alloc_pages += n;
    free_pages -= n;
    return va;
}

static __attribute__((noinline)) i64 sys_free(u64 n)
{
    if (n > alloc_pages || (nfree_ext >= MAX_EXTENTS - 1 && n))
        return -1;
    if (n == 0)
        return 0;
    unmap(alloc_pages - n, alloc_pages);
    reload_cr3();
    u64 left = n;
    while (left) {
        struct extent *a = &alloc_ext[nalloc_ext - 1];
        u64 take = a->n < left ? a->n : left;
        a->n -= take;
        if (a->n == 0)
            nalloc_ext--;
        free_insert(a->start + a->n, take);
        left -= take;
    }
    alloc_pages -= n;
    free_pages += n;
    if (q_report >= 0)
        report_free();
    return 0;
}

/* Forwards an app message: it must lie in one page of the app image, 8-byte aligned. */
static i64 sys_report(u64 va)
{
    u64 off = va - APP_BASE;
    if ((va & 7) || va < APP_BASE || va >= app_end || (va & 0xfff) > 0x1000 - ABI_MSG_SIZE)
        return -1;
    u64 pa = va < app_file_end ? (u64)app_blob + off : app_bss_pa + (va - app_file_end);
    volatile struct msg *m = (volatile struct msg *)pa;
    m->alloc_pages = alloc_pages;
    m->free_pages = free_pages;
    report(pa);
    return 0;
}

__attribute__((used)) u64 ksyscall(u64 a0, u64 a1, u64 nr)
{
    (void)a1;
    balloon_poll();
    switch (nr) {
    case SYS_REPORT:
        return (u64)sys_report(a0);
    case SYS_ALLOC:
        return sys_alloc(a0);
    case SYS_FREE:
        return (u64)sys_free(a0);
    case SYS_SLEEP:
        ksend(MSG_SLEEP, a0, 0, 0);
        return kmsg.reply;
    case SYS_EXIT:
        ksend(MSG_DONE, 0, 0, 0);
        halt();
    }
    return (u64)-1;
}

/* n consecutive entries v, v + step, ... (n may be 0). */
static __attribute__((noinline)) void fill_entries(u64 *e, u64 v, u64 n, u64 step)
{
    if (!n)
        return;
#pragma GCC unroll 8
    do {
        *e++ = v;
        v += step;
    } while (--n);
}

static const char banner[] = "memvisor guest\n";

__attribute__((noreturn, used)) void kmain(void)
{
    *(volatile u64 *)ABI_TSS_RSP0_ADDR = (u64)kstack_top;
    __asm__ volatile("lidt %0" : : "m"(*(char(*)[10])idt_desc));
    kmsg.magic = ABI_MSG_MAGIC;

    if (bi->magic != ABI_BOOT_MAGIC)
        boot_fail(BOOT_ERR_MAGIC, bi->magic);
    const struct app_header *ah = (const struct app_header *)app_blob;
    u64 file_pages = (ah->file_end - APP_BASE) >> 12;
    u64 bss_pages = (ah->bss_end - ah->file_end) >> 12;
    if (ah->magic != APP_MAGIC || ((ah->file_end | ah->bss_end) & 0xfff) ||
        ah->file_end < APP_BASE || ah->bss_end < ah->file_end ||
        (file_pages << 12) > (u64)(app_blob_end - app_blob) || file_pages + bss_pages > 512)
        boot_fail(BOOT_ERR_APP, ah->magic);
    app_file_end = ah->file_end;
    app_end = ah->bss_end;

    /* The reserved area after the kernel image, bump allocated. Sizes depend only on RAM. */
    u64 mem = bi->mem_bytes;
    if (mem > ABI_MAX_MEM_BYTES)
        boot_fail(BOOT_ERR_TOO_LARGE, mem);
    u64 mem_pages = mem >> 12;
    u64 regions = (mem_pages + 511) >> 9;            /* 2 MiB heap regions: one PT each */
    u64 heap_pds = (regions + 511) >> 9;             /* one PD per GiB of heap */
    u64 bm_words = (mem_pages + 63) >> 6;            /* one bitmap, sized for all of RAM */
    u64 bm_pages = (6 * bm_words * 8 + 4095) >> 12; /* the app's six bitmaps */
    /* Bitmaps of 2 MiB or more (RAM of 16 GiB or more) are mapped with 2 MiB pages. */
    int bm_huge = bm_pages >= 512;
    if (bm_huge)
        bm_pages = (bm_pages + 511) & ~511ULL;
    u64 bm_pts = bm_huge ? 0 : (bm_pages + 511) >> 9;
    u64 bm_pdes = bm_huge ? bm_pages >> 9 : bm_pts;
    u64 rsv = (u64)__kernel_end;
    u64 *pd1 = (u64 *)rsv;
    u64 *pt_app = pd1 + 512;
    u64 *pt_bi = pt_app + 512;
    u64 *pt_bm = pt_bi + 512;
    heap_pd = pt_bm + (bm_pts << 9);
    heap_pt = heap_pd + (heap_pds << 9);
    app_bss_pa = (u64)(heap_pt + (regions << 9));
    u64 bm_pa = app_bss_pa + (bss_pages << 12);
    if (bm_huge)
        bm_pa = (bm_pa + 0x1fffff) & ~0x1fffffULL;
    u64 rsv_end = bm_pa + (bm_pages << 12);
    u64 pool_start = (rsv_end + 0x1fffff) & ~0x1fffffULL;
    if (rsv_end > ABI_KERNEL_MAX_ADDR || rsv_end > mem || bm_pdes > PD1_UNMAPPED - PD1_BITMAPS ||
        PDPT_HEAP + heap_pds > 512)
        boot_fail(BOOT_ERR_NO_MEMORY, rsv_end);
    u64 pool_pages = pool_start < mem ? (mem - pool_start) >> 12 : 0;

    /* The app's page tables. The reserved area is zero (fresh guest RAM). */
    u64 *pdpt = (u64 *)ABI_PDPT_ADDR;
    pdpt[1] = (u64)pd1 | PTE_USER;
    pd1[PD1_APP] = (u64)pt_app | PTE_USER;
    fill_entries(pt_app, (u64)app_blob | PTE_USER, file_pages, ABI_PAGE_SIZE);
    fill_entries(pt_app + file_pages, app_bss_pa | PTE_USER, bss_pages, ABI_PAGE_SIZE);
    pd1[PD1_BOOT_INFO] = (u64)pt_bi | PTE_USER;
    pt_bi[0] = ABI_BOOT_INFO_ADDR | PTE_P | PTE_U; /* read-only */
    if (bm_huge) {
        fill_entries(&pd1[PD1_BITMAPS], bm_pa | PTE_USER | PTE_PS, bm_pdes, 512 * ABI_PAGE_SIZE);
    } else {
        fill_entries(&pd1[PD1_BITMAPS], (u64)pt_bm | PTE_USER, bm_pts, ABI_PAGE_SIZE);
        fill_entries(pt_bm, bm_pa | PTE_USER, bm_pages, ABI_PAGE_SIZE);
    }
    fill_entries(&pdpt[PDPT_HEAP], (u64)heap_pd | PTE_USER, heap_pds, ABI_PAGE_SIZE);
    reload_cr3();

    if (pool_pages) {
        free_ext[0].start = pool_start >> 12;
        free_ext[0].n = pool_pages;
        nfree_ext = 1;
    }
    free_pages = pool_pages;
    balloon_init();

    for (const char *s = banner; *s; s++)
        outb(ABI_COM1, (u8)*s);
    ksend(MSG_BOOT, pool_start, pool_pages, (rsv_end - rsv) >> 12);

    enter_user(APP_BITMAP_VA, (pool_pages + 63) >> 6, ah->entry, app_end);
}
