/* memvisor guest app (ring 3): runs the workload's phases over the heap and keeps exact ground
 * truth of what it touched, per phase and per reporting interval. See docs/abi.md. */
#include "../abi.h"

#define U64_MAX (~0ULL)
/* Accesses between TSC deadline checks (the interval id is checked before every access). */
#define DEADLINE_CHECK_EVERY 64

struct counts {
    u64 touched;    /* distinct heap pages read or written */
    u64 written;    /* distinct heap pages written */
    u64 iterations; /* page accesses */
    u64 hi;         /* bitmap bits at or above this page are all clear */
};

static volatile struct boot_info *const bi = (volatile struct boot_info *)APP_BOOT_INFO_VA;
static struct msg msgbuf __attribute__((aligned(128)));

static u64 *bm_phase_t, *bm_phase_w, *bm_win_t, *bm_win_w;
/* The fill of each heap page's last write: a bit in bm_fill_same (the seed's word) or in
 * bm_fill_zero (zero), neither for unique (index + 1). Kept for the life of a heap page. */
static u64 *bm_fill_same, *bm_fill_zero;
/* A page's word under `fill same`: from the seed, top bit set (never a page index + 1, never 0). */
static u64 same_word;
/* Some write used `fill same` or `fill zero`: only then do unique writes clear fill bits. */
static int fills_used;
static u64 heap_pages;  /* pages the app holds, from APP_HEAP_VA up */
static u64 touch_pages; /* pages of the running touch phase, else 0 */
static u64 tsc_khz, rng, cur_phase;
static struct counts ph, win;
/* verify: accesses that found a page holding something other than what the app wrote. */
static u64 mismatches;
static u64 cur_interval, win_tsc;

/* gcc may emit calls to these. */
__attribute__((used)) void *memset(void *d, int c, unsigned long n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

__attribute__((used)) void *memcpy(void *d, const void *s, unsigned long n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static inline u64 sys(u64 nr, u64 a0)
{
    u64 a1 = 0;
    __asm__ volatile("int3"
                     : "+a"(nr), "+D"(a0), "+S"(a1)
                     :
                     : "rcx", "rdx", "r8", "r9", "r10", "r11", "memory");
    return nr;
}

/* a + b, or U64_MAX when it does not fit. */
static inline u64 sat_add(u64 a, u64 b)
{
    u64 r;
    return __builtin_add_overflow(a, b, &r) ? U64_MAX : r;
}

/* a * b, or U64_MAX when it does not fit. */
static inline u64 sat_mul(u64 a, u64 b)
{
    u64 r;
    return __builtin_mul_overflow(a, b, &r) ? U64_MAX : r;
}

/* TSC ticks in ns nanoseconds, saturating at U64_MAX (never wraps to a short deadline). Whole
 * seconds and the sub-second rest are converted apart; the rest's products stay below
 * 1e6 * tsc_khz, far from overflow for any real TSC rate. */
static u64 ns_to_ticks(u64 ns)
{
    u64 secs = ns / 1000000000, rest = ns % 1000000000;
    u64 whole = sat_mul(sat_mul(secs, tsc_khz), 1000);
    u64 part = rest / 1000000 * tsc_khz + rest % 1000000 * tsc_khz / 1000000;
    return sat_add(whole, part);
}

/* Nanoseconds in t TSC ticks, saturating at U64_MAX. */
static u64 ticks_to_ns(u64 t)
{
    return sat_add(sat_mul(t / tsc_khz, 1000000), t % tsc_khz * 1000000 / tsc_khz);
}

/* xorshift64* */
static inline u64 next_rand(void)
{
    u64 x = rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng = x;
    return x * 0x2545f4914f6cdd1dULL;
}

/* Uniform in [0, n). */
static inline u64 range(u64 r, u64 n)
{
    return (u64)(((unsigned __int128)r * n) >> 64);
}

static void send(u32 kind, u64 interval, const struct counts *c, u64 a0, u64 a1, u64 a2)
{
    struct msg *m = &msgbuf;
    u64 *w = (u64 *)m;
    for (unsigned i = 0; i < ABI_MSG_SIZE / 8; i++)
        w[i] = 0;
    m->magic = ABI_MSG_MAGIC;
    m->kind = kind;
    m->phase = cur_phase;
    m->interval = interval;
    if (c) {
        m->touched = c->touched;
        m->written = c->written;
        m->iterations = c->iterations;
    }
    m->heap_pages = heap_pages;
    m->arg0 = a0;
    m->arg1 = a1;
    m->arg2 = a2;
    m->tsc = rdtsc();
    sys(SYS_REPORT, (u64)m);
}

static void clear_bits(u64 *b, u64 pages)
{
    u64 n = (pages + 63) >> 6;
    for (u64 i = 0; i < n; i++)
        b[i] = 0;
}

/* The VMM's clock (TIME hypercall): ns since the VM started. */
static u64 vmm_time(void)
{
    send(MSG_TIME, cur_interval, 0, 0, 0, 0);
    return msgbuf.reply;
}

/* The VMM moved to a new interval: report the one that ended and start counting afresh. */
static __attribute__((noinline)) void interval_end(void)
{
    u64 now = rdtsc();
    send(MSG_INTERVAL, cur_interval, &win, now - win_tsc, 0, 0);
    if (win.touched) {
        clear_bits(bm_win_t, win.hi);
        clear_bits(bm_win_w, win.hi);
    }
    win.touched = win.written = win.iterations = 0;
    win.hi = touch_pages;
    cur_interval = bi->interval;
    win_tsc = now;
}

static inline void check_interval(void)
{
    if (bi->interval != cur_interval)
        interval_end();
}

/* The checksum of heap page p: its 512 words, each weighted by an odd number that depends on its
 * place, so a lost, moved or swapped word shows. The app writes only a page's first word (weight 1):
 * its index + 1, same_word or 0 by the write's fill, so an intact written page sums to that word
 * (expected()) and a zero page to 0. */
static u64 page_sum(u64 p)
{
    const volatile u64 *a = (const volatile u64 *)(APP_HEAP_VA + (p << 12));
    u64 sum = 0;
    for (u64 i = 0; i < 512; i++)
        sum += a[i] * (2 * i + 1);
    return sum;
}

/* The first word (and checksum) of heap page p as its last write left it. */
static inline u64 expected(u64 p)
{
    u64 wi = p >> 6, b = 1ULL << (p & 63);
    if (bm_fill_zero[wi] & b)
        return 0;
    if (bm_fill_same[wi] & b)
        return same_word;
    return p + 1;
}

/* What a write of fill `fill` (PHASE_F_FILL_* or 0) puts in page p's first word; records the fill. */
static inline u64 fill_word(u64 p, u32 fill)
{
    u64 wi = p >> 6, b = 1ULL << (p & 63);
    if (fill == PHASE_F_FILL_SAME) {
        bm_fill_same[wi] |= b;
        bm_fill_zero[wi] &= ~b;
        return same_word;
    }
    if (fill == PHASE_F_FILL_ZERO) {
        bm_fill_zero[wi] |= b;
        bm_fill_same[wi] &= ~b;
        return 0;
    }
    if (fills_used) {
        bm_fill_same[wi] &= ~b;
        bm_fill_zero[wi] &= ~b;
    }
    return p + 1;
}

/* One page access. The interval is checked first, so the access counts in the interval the VMM was in
 * just before it (the gap is a few instructions, not the access, which may take a host fault). */
static inline __attribute__((always_inline)) void access(u64 p, int write, int verify, u32 fill)
{
    check_interval();
    volatile u64 *a = (volatile u64 *)(APP_HEAP_VA + (p << 12));
    u64 wi = p >> 6, b = 1ULL << (p & 63);
    if (verify && page_sum(p) != expected(p))
        mismatches++;
    if (write) {
        *a = fill_word(p, fill);
        if (!(bm_phase_w[wi] & b)) {
            bm_phase_w[wi] |= b;
            ph.written++;
        }
        if (!(bm_win_w[wi] & b)) {
            bm_win_w[wi] |= b;
            win.written++;
        }
    } else {
        (void)*a;
    }
    if (!(bm_phase_t[wi] & b)) {
        bm_phase_t[wi] |= b;
        ph.touched++;
    }
    if (!(bm_win_t[wi] & b)) {
        bm_win_t[wi] |= b;
        win.touched++;
    }
    ph.iterations++;
    win.iterations++;
}

static u64 phase_touch(u32 flags, u64 n, u64 duration, u64 hot, u64 permille)
{
    if (n > heap_pages || permille > 1000)
        return PHASE_BAD;
    if (n == 0)
        return PHASE_OK;
    touch_pages = n;
    ph.hi = n;
    if (win.hi < n)
        win.hi = n;
    int write = flags & PHASE_F_WRITE;
    int random = flags & PHASE_F_RANDOM;
    int verify = flags & PHASE_F_VERIFY;
    int mixed = flags & PHASE_F_MIXED;
    u32 fill = flags & (PHASE_F_FILL_SAME | PHASE_F_FILL_ZERO);
    if (fill == (PHASE_F_FILL_SAME | PHASE_F_FILL_ZERO))
        return PHASE_BAD;
    if (fill)
        fills_used = 1;
    int split = hot && hot < n;
    u64 total = duration ? U64_MAX : n; /* duration 0: one pass of n accesses */
    u64 deadline = duration ? sat_add(rdtsc(), ns_to_ticks(duration)) : 0;
    u64 seq = 0, seq_hot = 0, seq_cold = hot, acc = 0, done = 0;
    while (done < total) {
        u64 batch = total - done < DEADLINE_CHECK_EVERY ? total - done : DEADLINE_CHECK_EVERY;
        for (u64 i = 0; i < batch; i++) {
            u64 p;
            if (random) {
                u64 r = next_rand();
                if (split) {
                    u64 r2 = next_rand();
                    p = (((r >> 32) * 1000) >> 32) < permille ? range(r2, hot)
                                                              : hot + range(r2, n - hot);
                } else {
                    p = range(r, n);
                }
            } else if (split) {
                /* Evenly spread: every access adds permille/1000 of a hot access. */
                acc += permille;
                if (acc >= 1000) {
                    acc -= 1000;
                    p = seq_hot;
                    if (++seq_hot == hot)
                        seq_hot = 0;
                } else {
                    p = seq_cold;
                    if (++seq_cold == n)
                        seq_cold = hot;
                }
            } else {
                p = seq;
                if (++seq == n)
                    seq = 0;
            }
            if (mixed) {
                /* Reads and writes in turn. */
                if ((done + i) & 1)
                    access(p, 1, verify, fill);
                else
                    access(p, 0, verify, 0);
            } else if (verify) {
                if (write)
                    access(p, 1, 1, fill);
                else
                    access(p, 0, 1, 0);
            } else if (write) {
                access(p, 1, 0, fill);
            } else {
                access(p, 0, 0, 0);
            }
        }
        done += batch;
        if (duration && rdtsc() >= deadline)
            break;
    }
    touch_pages = 0;
    return mismatches ? PHASE_CORRUPT : PHASE_OK;
}

/* PHASE_END arg2 of a check phase: intact pages | zero pages << 32. */
static u64 check_result;

/* Reads the first n heap pages whole: a page written by `touch ... write` holds its last write's
 * word (expected()) in its first word and zeros after it (intact); a page the balloon released
 * reads zero (counted as zero unless its last write was `fill zero`, then it is intact). */
static u64 phase_check(u64 n)
{
    if (n > heap_pages)
        return PHASE_BAD;
    touch_pages = n;
    ph.hi = n;
    if (win.hi < n)
        win.hi = n;
    u64 intact = 0, zero = 0;
    for (u64 p = 0; p < n; p++) {
        access(p, 0, 0, 0);
        u64 v = *(volatile u64 *)(APP_HEAP_VA + (p << 12)), sum = page_sum(p), e = expected(p);
        intact += v == e && sum == e;
        zero += e != 0 && v == 0 && sum == 0;
    }
    touch_pages = 0;
    check_result = intact | zero << 32;
    return PHASE_OK;
}

static void phase_idle(u64 duration)
{
    u64 deadline = sat_add(rdtsc(), ns_to_ticks(duration));
    for (;;) {
        check_interval();
        u64 now = rdtsc();
        if (now >= deadline)
            break;
        sys(SYS_SLEEP, ticks_to_ns(deadline - now)); /* returns early at each VMM tick */
    }
}

static u64 run_phase(u32 kind, u32 flags, u64 pages, u64 duration, u64 hot, u64 permille)
{
    switch (kind) {
    case PHASE_ALLOC:
        if (pages) {
            u64 va = sys(SYS_ALLOC, pages);
            if (!va)
                return PHASE_OOM;
            if (va != APP_HEAP_VA + (heap_pages << 12))
                return PHASE_BAD;
            heap_pages += pages;
        }
        return PHASE_OK;
    case PHASE_FREE:
        if (pages > heap_pages)
            return PHASE_BAD;
        if (pages) {
            if (sys(SYS_FREE, pages) != 0)
                return PHASE_BAD;
            /* The freed pages' fills are forgotten: a page allocated there later is unique. */
            for (u64 q = heap_pages - pages; q < heap_pages; q++) {
                bm_fill_same[q >> 6] &= ~(1ULL << (q & 63));
                bm_fill_zero[q >> 6] &= ~(1ULL << (q & 63));
            }
            heap_pages -= pages;
        }
        return PHASE_OK;
    case PHASE_TOUCH:
        return phase_touch(flags, pages, duration, hot, permille);
    case PHASE_IDLE:
        phase_idle(duration);
        return PHASE_OK;
    case PHASE_CHECK:
        return phase_check(pages);
    case PHASE_FAULT:
        (void)*(volatile u64 *)APP_UNMAPPED_VA; /* the kernel reports the #PF and halts */
        return PHASE_BAD;
    }
    return PHASE_BAD;
}

void app_main(u64 *bitmaps, u64 words)
{
    if (bi->magic != ABI_BOOT_MAGIC)
        return;
    bm_phase_t = bitmaps;
    bm_phase_w = bitmaps + words;
    bm_win_t = bitmaps + 2 * words;
    bm_win_w = bitmaps + 3 * words;
    bm_fill_same = bitmaps + 4 * words;
    bm_fill_zero = bitmaps + 5 * words;
    tsc_khz = bi->tsc_khz ? bi->tsc_khz : 1000000;
    rng = bi->seed * 0x9e3779b97f4a7c15ULL + 0x632be59bd9b4e019ULL;
    if (!rng)
        rng = 1;
    /* splitmix64's finalizer of the seed: guests with the same seed write the same word. */
    same_word = bi->seed + 0x9e3779b97f4a7c15ULL;
    same_word = (same_word ^ (same_word >> 30)) * 0xbf58476d1ce4e5b9ULL;
    same_word = (same_word ^ (same_word >> 27)) * 0x94d049bb133111ebULL;
    same_word = (same_word ^ (same_word >> 31)) | (1ULL << 63);
    cur_interval = bi->interval;
    win_tsc = rdtsc();
    u64 nphases = bi->nphases < ABI_MAX_PHASES ? bi->nphases : ABI_MAX_PHASES;

    for (u64 i = 0; i < nphases; i++) {
        volatile struct phase *p = &bi->phases[i];
        u32 kind = p->kind, flags = p->flags;
        u64 pages = p->pages, duration = p->duration_ns, hot = p->hot_pages,
            permille = p->hot_permille;
        cur_phase = i;
        if (ph.touched) {
            clear_bits(bm_phase_t, ph.hi);
            clear_bits(bm_phase_w, ph.hi);
        }
        ph.touched = ph.written = ph.iterations = ph.hi = 0;
        check_interval();
        send(MSG_PHASE_START, cur_interval, 0, vmm_time(), 0, 0);
        u64 t0 = rdtsc();
        u64 status = run_phase(kind, flags, pages, duration, hot, permille);
        u64 ticks = rdtsc() - t0;
        check_interval();
        /* arg2: a check phase's counts, or a verify phase's mismatches (a phase is one or the other). */
        send(MSG_PHASE_END, cur_interval, &ph, ticks, status, check_result | mismatches);
        check_result = 0;
        mismatches = 0;
        if (status == PHASE_OOM)
            break;
    }
    send(MSG_INTERVAL, cur_interval, &win, rdtsc() - win_tsc, 1, 0);
    sys(SYS_EXIT, 0);
}
