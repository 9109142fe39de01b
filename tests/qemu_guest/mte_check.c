/* A guest workload that checks its own MTE tags: /init of the initramfs of the QEMU round trip.
 *
 * It maps a region with PROT_MTE, gives every page a random tag (IRG, then STG on each of its
 * 16-byte granules) and every granule a value derived from its number, and keeps the tags it
 * expects in an untagged array. Then it loops: each pass loads every granule through a pointer
 * carrying its page's expected tag, with synchronous tag checks (a lost or shifted tag faults
 * at once), compares the value, reads the allocation tag back with LDG, retags a sixteenth of
 * the pages, and prints one line on the console. A failure prints "mte-check FAIL ..." and
 * stops. What a migration may get wrong, a page's data or its tags, shows on the next pass.
 *
 * One tag per page, not per granule: QEMU 7.2's TCG (Debian's qemu-system-arm) stores every
 * granule of a page in the same tag byte (measured: after STG of eight granules with eight
 * tags, LDG of any of them returns the last pair's), so tags that differ within a page do not
 * survive even without a migration. Tags per page still change, travel and are checked.
 *
 * Build: aarch64-linux-gnu-gcc -static -O2 -march=armv8.5-a+memtag -o init mte_check.c
 */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>

#ifndef PR_SET_TAGGED_ADDR_CTRL
#define PR_SET_TAGGED_ADDR_CTRL 55
#endif
#ifndef PR_TAGGED_ADDR_ENABLE
#define PR_TAGGED_ADDR_ENABLE (1UL << 0)
#endif
#ifndef PR_MTE_TCF_SYNC
#define PR_MTE_TCF_SYNC (1UL << 1)
#endif
#ifndef PR_MTE_TAG_SHIFT
#define PR_MTE_TAG_SHIFT 3
#endif
#ifndef PROT_MTE
#define PROT_MTE 0x20
#endif

#define REGION_BYTES (4UL << 20)
#define GRANULE 16UL
#define PAGE 4096UL
#define GRANULES (REGION_BYTES / GRANULE)
#define PAGES (REGION_BYTES / PAGE)

static uint8_t expected[PAGES];
static volatile unsigned long current_granule;

static uint64_t irg(uint64_t pointer) {
    __asm__ volatile("irg %0, %0" : "+r"(pointer));
    return pointer;
}

static void stg(uint64_t pointer) { __asm__ volatile("stg %0, [%0]" : : "r"(pointer) : "memory"); }

static uint64_t ldg(uint64_t pointer) {
    __asm__ volatile("ldg %0, [%0]" : "+r"(pointer));
    return pointer;
}

static uint64_t value_of(unsigned long granule, unsigned generation) {
    return (granule * 0x9E3779B97F4A7C15ULL) ^ generation;
}

static void on_fault(int sig, siginfo_t *info, void *context) {
    (void)context;
    char line[160];
    int n = snprintf(line, sizeof line, "mte-check FAIL: signal %d (code %d) at granule %lu, address %p\n", sig,
                     info->si_code, current_granule, info->si_addr);
    write(1, line, (size_t)n);
    _exit(1);
}

static void retag(uint64_t base, unsigned long page, unsigned generation) {
    uint64_t pointer = irg(base + page * PAGE);
    for (unsigned long offset = 0; offset < PAGE; offset += GRANULE) stg(pointer + offset);
    expected[page] = (uint8_t)((pointer >> 56) & 0xF);
    for (unsigned long offset = 0; offset < PAGE; offset += GRANULE) {
        unsigned long granule = (page * PAGE + offset) / GRANULE;
        *(volatile uint64_t *)(pointer + offset) = value_of(granule, generation);
    }
}

int main(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &action, NULL);
    sigaction(SIGBUS, &action, NULL);
    /* synchronous checks; IRG draws from every tag but 0 */
    if (prctl(PR_SET_TAGGED_ADDR_CTRL, PR_TAGGED_ADDR_ENABLE | PR_MTE_TCF_SYNC | (0xFFFEUL << PR_MTE_TAG_SHIFT), 0, 0,
              0)) {
        printf("mte-check FAIL: no MTE (prctl)\n");
        return 1;
    }
    void *region = mmap(NULL, REGION_BYTES, PROT_READ | PROT_WRITE | PROT_MTE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) {
        printf("mte-check FAIL: no PROT_MTE mapping\n");
        return 1;
    }
    uint64_t base = (uint64_t)region;
    static unsigned generation_of[PAGES];
    for (unsigned long p = 0; p < PAGES; p++) retag(base, p, 0);
    printf("mte-check ready: %lu pages tagged\n", PAGES);
    fflush(stdout);
    for (unsigned pass = 1;; pass++) {
        unsigned long tagged = 0;
        for (unsigned long g = 0; g < GRANULES; g++) {
            unsigned long page = g * GRANULE / PAGE;
            current_granule = g;
            uint64_t pointer = (base + g * GRANULE) | ((uint64_t)expected[page] << 56);
            uint64_t value = *(volatile uint64_t *)pointer; /* faults on a wrong tag */
            if (value != value_of(g, generation_of[page])) {
                printf("mte-check FAIL: pass %u granule %lu holds %llx\n", pass, g, (unsigned long long)value);
                return 1;
            }
            if (((ldg(base + g * GRANULE) >> 56) & 0xF) != expected[page]) {
                printf("mte-check FAIL: pass %u granule %lu tag differs\n", pass, g);
                return 1;
            }
        }
        for (unsigned long p = 0; p < PAGES; p++) tagged += expected[p] != 0;
        /* a sixteenth of the pages get new tags and values: the guest keeps changing both */
        for (unsigned long p = pass % 16; p < PAGES; p += 16) {
            generation_of[p] = pass;
            retag(base, p, pass);
        }
        printf("mte-check pass %u ok (%lu granules checked, %lu of %lu pages tagged)\n", pass, GRANULES, tagged, PAGES);
        fflush(stdout);
    }
}
