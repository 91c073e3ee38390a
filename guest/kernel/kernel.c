/* memvisor guest kernel (ring 0).
 *
 * Ring 0 runs through the host's instruction emulator (about 1.3 us per instruction), so this
 * kernel does as little as possible: it maps the app, keeps the pool's free and allocated lists as
 * extent lists (never touching pool pages), maps and unmaps the heap, and forwards messages.
 * See docs/abi.md. */
#include "../abi.h"

#define PTE_P 0x1ULL
#define PTE_RW 0x2ULL
#define PTE_U 0x4ULL
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

/* Returns frames [start, start + n) to the free list, merging with neighbours. */
static void free_insert(u64 start, u64 n)
{
    u64 i = 0;
    while (i < nfree_ext && free_ext[i].start < start)
        i++;
    int prev = i > 0 && free_ext[i - 1].start + free_ext[i - 1].n == start;
    int next = i < nfree_ext && start + n == free_ext[i].start;
    if (prev && next) {
        free_ext[i - 1].n += n + free_ext[i].n;
        for (u64 j = i + 1; j < nfree_ext; j++)
            free_ext[j - 1] = free_ext[j];
        nfree_ext--;
    } else if (prev) {
        free_ext[i - 1].n += n;
    } else if (next) {
        free_ext[i].start = start;
        free_ext[i].n += n;
    } else {
        for (u64 j = nfree_ext; j > i; j--)
            free_ext[j] = free_ext[j - 1];
        free_ext[i].start = start;
        free_ext[i].n = n;
        nfree_ext++;
    }
}

static __attribute__((noinline)) u64 sys_alloc(u64 n)
{
    /* An allocation adds at most one allocated extent per free extent it consumes; a free adds at
     * most one free extent. Refusing when the lists could overflow keeps both bounded (with LIFO
     * frees and lowest-address-first allocation there is in fact one extent on each list). */
    if (n == 0 || n > free_pages || nalloc_ext + nfree_ext >= MAX_EXTENTS - 1)
        return 0;
    u64 vp = alloc_pages;
    u64 va = APP_HEAP_VA + (vp << 12);
    u64 left = n;
    while (left) {
        struct extent *e = &free_ext[0];
        u64 take = e->n < left ? e->n : left;
        map(vp, e->start, take);
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
    u64 bm_pages = (4 * bm_words * 8 + 4095) >> 12; /* the four bitmaps */
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

    for (const char *s = banner; *s; s++)
        outb(ABI_COM1, (u8)*s);
    ksend(MSG_BOOT, pool_start, pool_pages, (rsv_end - rsv) >> 12);

    enter_user(APP_BITMAP_VA, (pool_pages + 63) >> 6, ah->entry, app_end);
}
