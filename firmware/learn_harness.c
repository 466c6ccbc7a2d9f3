/* learn_harness.c: on-device learning on the Cortex-M4, every learned code reported to the host.
 *
 * fw_learn_data.h (written by exporters/firmware_learn.py) includes the model's learn header and
 * defines FW_N_STEPS, FW_DUMP_EVERY, the labelled samples fw_x[FW_N_STEPS][FW_INPUT_SIZE] (input
 * codes, in flash: a stand-in for the sensor) and fw_y[FW_N_STEPS].  For each sample we call
 * bll_learn_step and print, over semihosting:
 *
 *     F <SysTick ticks of one inference alone>                              (once, first)
 *     S <step> <ticks of bll_learn_step> <hash of each learned array>       (every step)
 *     W <step> <array> <code> <code> ...   (every learned code, every FW_DUMP_EVERY steps and last)
 *
 * then "DONE <steps>".  A hash is sum_k code_k * K_k mod 2**64 with K_k = s_k | 1 and
 * s_{k+1} = s_k * 6364136223846793005 + 1442695040888963407 (Knuth's MMIX LCG), s_0 =
 * 0x9E3779B97F4A7C15: any single changed code changes it.  The host compares everything with the
 * Python integer twin; nothing is compared here.
 */
#include <stdint.h>
#include <stdio.h>

#include "fw_learn_data.h"
#include "systick.h"

static int32_t trace[FW_TRACE_SIZE];   /* the inference's activation memory, reused by the update */
static int32_t input[FW_INPUT_SIZE];

static uint64_t array_hash(const bll_learn_array *a)
{
    uint64_t s = 0x9E3779B97F4A7C15ull, h = 0;
    long k;
    for (k = 0; k < a->n; ++k) {
        int64_t v = a->w ? (int64_t)a->w[k] : a->c[k];
        h += (uint64_t)v * (s | 1u);
        s = s * 6364136223846793005ull + 1442695040888963407ull;
    }
    return h;
}

static void dump(long step)
{
    long a, k;
    for (a = 0; a < BLL_LEARN_N_ARRAYS; ++a) {
        const bll_learn_array *p = &bll_learn_arrays[a];
        printf("W %ld %ld", step, a);
        for (k = 0; k < p->n; ++k)
            printf(" %ld", (long)(p->w ? (int64_t)p->w[k] : p->c[k]));
        printf("\n");
    }
}

static void load(long s)
{
    long k;
    for (k = 0; k < FW_INPUT_SIZE; ++k)
        input[k] = (int32_t)fw_x[s][k];
}

int main(void)
{
    long s, a;
    uint64_t t0, t;
    int rc;
    ticks_start();
    load(0);
    t0 = ticks_now();
    rc = FW_RUN(input, trace);
    t = ticks_now() - t0;
    if (rc != 0) {
        printf("ERROR sample 0: input codes outside the input format\n");
        return 2;
    }
    printf("F %lu\n", (unsigned long)t);
    for (s = 0; s < FW_N_STEPS; ++s) {
        load(s);
        t0 = ticks_now();
        rc = bll_learn_step(input, (int32_t)fw_y[s], trace);
        t = ticks_now() - t0;
        if (rc != 0) {
            printf("ERROR step %ld: bll_learn_step returned %d\n", s, rc);
            return 2;
        }
        printf("S %ld %lu", s, (unsigned long)t);
        for (a = 0; a < BLL_LEARN_N_ARRAYS; ++a) {
            uint64_t h = array_hash(&bll_learn_arrays[a]);
            printf(" %08lx%08lx", (unsigned long)(h >> 32), (unsigned long)(h & 0xFFFFFFFFu));
        }
        printf("\n");
        if ((s + 1) % FW_DUMP_EVERY == 0 || s == FW_N_STEPS - 1)
            dump(s);
    }
    printf("DONE %ld\n", (long)FW_N_STEPS);
    return 0;
}
