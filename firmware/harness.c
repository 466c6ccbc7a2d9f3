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

#include "systick.h"                  /* ticks_start, ticks_now: instructions under QEMU -icount */

static int32_t trace[FW_TRACE_SIZE];   /* every record's codes: the model's activation memory */
static int32_t input[FW_INPUT_SIZE];

int main(void)
{
    long s, r, k;
    uint64_t t0;
    ticks_start();
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
