/* harness.c: runs the C golden model on the Cortex-M4 and prints every code it computes.
 *
 * fw_inputs.h (written by exporters/firmware.py next to the generated model) includes the
 * model's header and defines FW_RUN, FW_N_RECORDS, FW_TRACE_SIZE, FW_INPUT_SIZE, FW_OFFSETS
 * and the stored calibration input codes fw_input[FW_N_SAMPLES][FW_INPUT_SIZE] (in flash, in
 * the smallest C type of the input format).  For each sample we run the model into one int32
 * trace buffer and print, over semihosting, one line per record:
 *
 *     C <sample> <SysTick ticks of the inference>
 *     T <sample> <record> <code> <code> ...
 *
 * then "DONE <samples>".  The host (exporters/firmware.py) compares every code with the traces
 * of the HDF5 file; nothing is compared here, so the check does not trust the device.
 */
#include <stdint.h>
#include <stdio.h>

#include "fw_inputs.h"

/* SysTick (ARMv7-M ARM, B3.3): a 24-bit down-counter on the core clock, present on every
   Cortex-M; its interrupt counts the wraps, so an inference may take any number of ticks.  Under
   QEMU -icount shift=0 the virtual clock advances 1 ns per instruction, so on mps2-an386 (25 MHz)
   one tick is 40 instructions: the ticks count instructions, not a real chip's cycles. */
#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)
#define SCB_ICSR (*(volatile uint32_t *)0xE000ED04u)
#define ICSR_PENDSTSET (1u << 26)          /* SysTick exception pending */
#ifndef SYST_PERIOD
#define SYST_PERIOD 0x1000000u             /* 2**24 ticks between wraps (the tests try shorter) */
#endif

static volatile uint32_t systick_wraps;

void SysTick_Handler(void)
{
    ++systick_wraps;
}

/* Ticks since the counter was started: wraps * SYST_PERIOD + the elapsed part of this period. */
static uint64_t ticks_now(void)
{
    uint32_t w, v;
    __asm__ volatile("cpsid i" ::: "memory");       /* the wrap handler cannot run while we read */
    w = systick_wraps;
    v = SYST_CVR;
    /* A wrap whose handler has not run yet: the counter was already reloaded (v near the top). */
    if ((SCB_ICSR & ICSR_PENDSTSET) && v > SYST_PERIOD / 2)
        ++w;
    __asm__ volatile("cpsie i" ::: "memory");
    return (uint64_t)w * SYST_PERIOD + (SYST_PERIOD - 1u - v);
}

static int32_t trace[FW_TRACE_SIZE];   /* every record's codes: the model's activation memory */
static int32_t input[FW_INPUT_SIZE];

int main(void)
{
    long s, r, k;
    uint64_t t0;
    SYST_RVR = SYST_PERIOD - 1u;           /* longest period */
    SYST_CVR = 0;                          /* any write clears the count: reload on the next tick */
    SYST_CSR = 7u;                         /* enable, interrupt on wrap, core clock */
    for (s = 0; s < FW_N_SAMPLES; ++s) {
        for (k = 0; k < FW_INPUT_SIZE; ++k)
            input[k] = (int32_t)fw_input[s][k];
        t0 = ticks_now();
        if (FW_RUN(input, trace) != 0) {
            printf("ERROR sample %ld: input codes outside the input format\n", s);
            return 2;
        }
        printf("C %ld %lu\n", s, (unsigned long)(ticks_now() - t0));   /* ticks of one inference */
        for (r = 0; r < FW_N_RECORDS; ++r) {
            printf("T %ld %ld", s, r);
            for (k = FW_OFFSETS[r]; k < FW_OFFSETS[r + 1]; ++k)
                printf(" %ld", (long)trace[k]);
            printf("\n");
        }
    }
    printf("DONE %ld\n", (long)FW_N_SAMPLES);
    return 0;
}
